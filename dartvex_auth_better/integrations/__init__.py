"""Glue between dartvex_auth_better and web frameworks.

Each integration lives in its own module and imports its framework only there, so this
package costs nothing to import and needs no optional dependency:

* :mod:`dartvex_auth_better.integrations.starlette`: Starlette and FastAPI (the
  ``starlette`` extra).
"""

__all__: list[str] = []
