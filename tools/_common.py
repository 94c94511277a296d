"""The tools' shared helpers now live in the package (collector.tools.common)."""

from collector.tools.common import *  # noqa: F403
from collector.tools.common import (  # noqa: F401
    free_port,
    mosquitto,
    mosquitto_path,
    proc_stat,
    rcvbuf_errors,
    scrape,
    wait_for_tcp,
)
