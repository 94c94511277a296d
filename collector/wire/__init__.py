"""Wire formats with no I/O: datagrams, the control channel, the dashboard stream, the recording
format, the anti-replay window and the key derivations. Bytes in, values out, and back."""
