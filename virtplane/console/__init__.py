"""Serial console, VNC, port-forward and console-log endpoints of a node (mounted by the node agent), and the
client-side pieces virtctl uses to drive them.

Node side: `add_console_routes(app, locate, authorize)` (routes.py) with `LocatedVMI` (located.py).
"""

from .located import ConsoleError, LocatedVMI, QMPExecutor
from .routes import ConsoleRoutes, add_console_routes

__all__ = ["ConsoleError", "ConsoleRoutes", "LocatedVMI", "QMPExecutor", "add_console_routes"]
