"""What the command-line tools are built from: replay and the stand-in collector."""
