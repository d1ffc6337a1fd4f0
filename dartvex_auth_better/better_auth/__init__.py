"""The Better Auth side of the SDK: HTTP only, knows nothing of WebSockets."""
