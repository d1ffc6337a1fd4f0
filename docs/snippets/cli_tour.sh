#!/usr/bin/env bash
# A tour of the command line. Usage: cli_tour.sh EMAIL < password-file
# Needs DARTVEX_URL (and, for a local or self-hosted Better Auth, DARTVEX_SITE_URL).
set -euo pipefail
email="$1"

# Create the account and sign in; the password is the first line of stdin.
dartvex-auth-better signup "$email" --name Ada --password-stdin

# The session is saved: from here on no command asks for a password.
dartvex-auth-better whoami
dartvex-auth-better mutation messages:send '{"body": "hello from the shell"}'
dartvex-auth-better query messages:list

# A live query: one JSON line now and one per change, until Ctrl-C. Here `head` takes
# the first line and leaves; watch then exits with 141 (stdout closed early).
dartvex-auth-better watch messages:list | head -n 1 || [ $? -eq 141 ]

# A fresh Convex JWT for another tool, e.g. curl against the Convex HTTP API.
jwt="$(dartvex-auth-better token)"
echo "got a JWT of ${#jwt} characters"

# Sign out on the server and forget the saved session.
dartvex-auth-better logout
status=0
dartvex-auth-better whoami 2>/dev/null || status=$?
echo "whoami now exits with $status"  # 3: not signed in
