"""The local stack, shipped for your tests and ours.

* ``LocalBetterAuth``: the real Better Auth server (npm ``better-auth`` with the Convex
  plugin) run under Node on a loopback port.
* ``LocalConvex``: a Convex sync-protocol server over aiohttp.web that runs Python
  functions registered under Convex names and verifies JWTs for real.
* ``register_demo_app``: the demo's message functions.
* pytest fixtures in ``dartvex_auth_better.testing.pytest_plugin``.

Needs the ``testing`` extra (``pip install dartvex-auth-better[testing]``).
"""

from ._better_auth import LocalBetterAuth, LocalStackError
from ._convex_server import LocalConvex, TestTokenIssuer
from ._demo_app import register_demo_app

__all__ = (
    "LocalBetterAuth",
    "LocalConvex",
    "LocalStackError",
    "TestTokenIssuer",
    "register_demo_app",
)
