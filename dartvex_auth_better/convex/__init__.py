"""The Convex side of the SDK: sync client, values, protocol. Knows nothing of Better Auth."""
