"""The core: device sessions, the datagram path, commands, the stream hub and the recorder.
Synchronous where it sits on the ingest path; the Trio tasks it needs are started by the app."""
