"""The Trio servers: UDP ingest, the TCP control channel, the HTTP port (dashboard, API,
metrics, WebSocket stream). They move bytes between sockets and the wire formats."""
