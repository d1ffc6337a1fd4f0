// A local Better Auth server with the Convex plugin, for tests of dartvex_auth_better.
//
// It runs the real `better-auth` package and the real `convex` plugin from
// `@convex-dev/better-auth` in plain Node, on Better Auth's in-memory adapter, so the
// endpoints under /api/auth behave as they do on a Convex deployment's *.convex.site.
// Everything lives in memory and is gone when the process exits.
//
// Test-only routes (outside Better Auth):
//   GET    /test/outbox?email=&type=  messages the server "sent" (reset links, magic links)
//   DELETE /test/outbox               forget them
//   POST   /test/reset[?jwks=1]       wipe users, sessions, accounts, verifications, outbox
//                                     (and the signing keys with jwks=1)
//   GET    /test/issued-session-tokens  every session token issued so far (leak checks)
//   GET    /test/health               {"ok":true}
//   GET    /test/db                   raw tables, only with BA_DEBUG_DB=1
//
// Configuration is by environment variable; see readConfig() below. The server never
// writes tokens, passwords or links to stdout/stderr: the outbox is served over HTTP only.

import http from "node:http";
import { performance } from "node:perf_hooks";

import { betterAuth } from "better-auth";
import { memoryAdapter } from "better-auth/adapters/memory";
import { bearer, magicLink } from "better-auth/plugins";
import { convex } from "@convex-dev/better-auth/plugins";
import { getAuthConfigProvider } from "@convex-dev/better-auth/auth-config";

// Telemetry is switched off in the options too; Better Auth reads this variable when the
// auth instance is built (imports are hoisted, so this is the earliest point that counts).
process.env.BETTER_AUTH_TELEMETRY = "0";

const BASE_PATH = "/api/auth";
const DEFAULT_SECRET = "dartvex-auth-better-local-test-secret-not-for-production";
const ALWAYS_TRUSTED = ["http://localhost:3000", "http://127.0.0.1:3000"];
const CORS_EXPOSE = ["set-auth-token", "Set-Better-Auth-Cookie"];
const CORS_ALLOW_METHODS = "GET, POST, OPTIONS";
const CORS_ALLOW_HEADERS = "Content-Type, Authorization, Better-Auth-Cookie";

// Exit at once on a signal: all state is in memory, there is nothing to flush.
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}

function intEnv(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw.trim() === "") return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    fail(`${name} must be a non-negative integer, got ${JSON.stringify(raw)}`);
  }
  return value;
}

function fail(message) {
  process.stderr.write(`error: ${message}\n`);
  process.exit(2);
}

function readConfig() {
  return {
    port: intEnv("PORT", 3211),
    jwtTtlSeconds: intEnv("JWT_TTL_SECONDS", 900),
    sessionTtlSeconds: intEnv("SESSION_TTL_SECONDS", 604800),
    sessionUpdateAgeSeconds: intEnv("SESSION_UPDATE_AGE_SECONDS", 86400),
    extraTrustedOrigins: (process.env.TRUSTED_ORIGINS ?? "")
      .split(",")
      .map((origin) => origin.trim())
      .filter((origin) => origin !== ""),
    secret: process.env.BETTER_AUTH_SECRET || DEFAULT_SECRET,
    rateLimitMax: intEnv("RATE_LIMIT_MAX", null),
    rateLimitWindowSeconds: intEnv("RATE_LIMIT_WINDOW_SECONDS", 10),
    noopWrites: process.env.BA_CONVEX_NOOP_WRITES === "1",
    debugDb: process.env.BA_DEBUG_DB === "1",
    // Set by LocalBetterAuth, which holds our stdin open: when the parent dies, even by
    // SIGKILL, stdin reaches EOF and we exit instead of lingering as an orphan.
    exitOnStdinEof: process.env.BA_EXIT_ON_STDIN_EOF === "1",
  };
}

// The in-memory database. The convex plugin adds the `jwks` model, so that table must
// exist up front like the four core ones.
const TABLES = ["user", "session", "account", "verification", "jwks"];
const db = Object.fromEntries(TABLES.map((table) => [table, []]));

// Messages the server would have emailed, oldest first.
let outbox = [];

// Every session token this server issued, oldest first (kept through /test/reset), so a
// test suite can check that none of them ever reached a log.
const issuedSessionTokens = [];

function pushOutbox(type, email, token, url) {
  outbox.push({ type, email, token, url, createdAt: new Date().toISOString() });
}

function buildAuth(config, siteUrl, trustedOrigins) {
  // The convex plugin and getAuthConfigProvider() read CONVEX_SITE_URL when they are
  // called: it becomes the JWT issuer and the base of the JWKS URL.
  process.env.CONVEX_SITE_URL = siteUrl;
  const authConfig = { providers: [getAuthConfigProvider()] };

  const adapterFactory = memoryAdapter(db);
  // The convex plugin turns every adapter write into a no-op unless the adapter says it
  // runs in a Convex mutation context (true for HTTP actions on Convex). The memory adapter
  // has no such flag, so mark it; BA_CONVEX_NOOP_WRITES=1 shows what happens without.
  const database = config.noopWrites
    ? adapterFactory
    : (options) => {
        const adapter = adapterFactory(options);
        adapter.options = { ...(adapter.options ?? {}), isRunMutationCtx: true };
        return adapter;
      };

  const rateLimit =
    config.rateLimitMax === null
      ? { enabled: false }
      : {
          enabled: true,
          storage: "memory",
          max: config.rateLimitMax,
          window: config.rateLimitWindowSeconds,
        };

  return betterAuth({
    baseURL: siteUrl,
    basePath: BASE_PATH,
    secret: config.secret,
    database,
    trustedOrigins,
    telemetry: { enabled: false },
    rateLimit,
    session: {
      expiresIn: config.sessionTtlSeconds,
      updateAge: config.sessionUpdateAgeSeconds,
    },
    databaseHooks: {
      session: {
        create: {
          after: async (session) => {
            issuedSessionTokens.push(session.token);
          },
        },
      },
    },
    emailAndPassword: {
      enabled: true,
      requireEmailVerification: false,
      sendResetPassword: async ({ user, url, token }) => {
        pushOutbox("reset-password", user.email, token, url);
      },
    },
    plugins: [
      bearer(),
      magicLink({
        sendMagicLink: async ({ email, url, token }) => {
          pushOutbox("magic-link", email, token, url);
        },
      }),
      convex({ authConfig, jwt: { expirationSeconds: config.jwtTtlSeconds } }),
    ],
  });
}

function sendJson(res, status, body, extraHeaders = {}) {
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    ...extraHeaders,
    "content-type": "application/json",
    "content-length": Buffer.byteLength(payload),
  });
  res.end(payload);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

// Adds the CORS headers for a trusted Origin. Header names are lower-cased by the caller.
function corsHeaders(origin, trusted) {
  if (!origin || !trusted.has(origin)) return {};
  return {
    "access-control-allow-origin": origin,
    "access-control-allow-credentials": "true",
    "access-control-expose-headers": CORS_EXPOSE.join(", "),
    vary: "Origin",
  };
}

function mergeLists(a, b) {
  const seen = new Set();
  const out = [];
  for (const item of [...a.split(","), ...b.split(",")]) {
    const value = item.trim();
    if (value === "" || seen.has(value.toLowerCase())) continue;
    seen.add(value.toLowerCase());
    out.push(value);
  }
  return out.join(", ");
}

// Hands a Node request to Better Auth's fetch-style handler and writes its Response back,
// merging in the CORS headers (the bearer plugin sets its own expose-headers list, which
// must not replace ours).
async function forwardToAuth(auth, siteUrl, req, res, cors) {
  const headers = new Headers();
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    headers.append(req.rawHeaders[i], req.rawHeaders[i + 1]);
  }
  const init = { method: req.method, headers };
  if (req.method !== "GET" && req.method !== "HEAD") {
    const body = await readBody(req);
    if (body.length > 0) init.body = body;
  }
  const response = await auth.handler(new Request(siteUrl + req.url, init));

  const out = {};
  for (const [name, value] of response.headers) {
    if (name === "set-cookie") continue;
    out[name] = value;
  }
  const cookies = response.headers.getSetCookie();
  if (cookies.length > 0) out["set-cookie"] = cookies;
  for (const [name, value] of Object.entries(cors)) {
    if (name === "access-control-expose-headers" && out[name]) {
      out[name] = mergeLists(value, out[name]);
    } else if (name === "vary" && out[name]) {
      out[name] = mergeLists(out[name], value);
    } else {
      out[name] = value;
    }
  }
  // Better Auth's bodies are small JSON documents: buffer them, so every response has a
  // content-length and clients need no chunked decoding.
  const body = response.body === null ? Buffer.alloc(0) : Buffer.from(await response.arrayBuffer());
  out["content-length"] = String(body.length);
  res.writeHead(response.status, out);
  res.end(body);
}

function handleTestRoute(url, req, res, cors, config) {
  const path = url.pathname;
  if (path === "/test/health" && req.method === "GET") {
    sendJson(res, 200, { ok: true }, cors);
  } else if (path === "/test/outbox" && req.method === "GET") {
    const email = url.searchParams.get("email");
    const type = url.searchParams.get("type");
    const messages = outbox.filter(
      (m) =>
        (!email || m.email.toLowerCase() === email.toLowerCase()) && (!type || m.type === type),
    );
    sendJson(res, 200, { messages }, cors);
  } else if (path === "/test/outbox" && req.method === "DELETE") {
    outbox = [];
    sendJson(res, 200, { ok: true }, cors);
  } else if (path === "/test/reset" && req.method === "POST") {
    const wipeKeys = ["1", "true"].includes(url.searchParams.get("jwks") ?? "");
    for (const table of TABLES) {
      if (table !== "jwks" || wipeKeys) db[table] = [];
    }
    outbox = [];
    sendJson(res, 200, { ok: true, jwks: wipeKeys }, cors);
  } else if (path === "/test/issued-session-tokens" && req.method === "GET") {
    sendJson(res, 200, { tokens: issuedSessionTokens }, cors);
  } else if (path === "/test/db" && req.method === "GET" && config.debugDb) {
    sendJson(res, 200, db, cors);
  } else {
    return false;
  }
  return true;
}

async function main() {
  const config = readConfig();
  let auth = null;
  let siteUrl = null;
  let trusted = new Set();

  const server = http.createServer(async (req, res) => {
    try {
      if (auth === null) {
        // Only reachable with a fixed PORT, by a client that guessed it early.
        sendJson(res, 503, { message: "Starting" });
        return;
      }
      const url = new URL(req.url, siteUrl);
      const origin = req.headers.origin;
      const cors = corsHeaders(origin, trusted);

      if (req.method === "OPTIONS") {
        const preflight = origin && trusted.has(origin)
          ? {
              ...cors,
              "access-control-allow-methods": CORS_ALLOW_METHODS,
              "access-control-allow-headers": CORS_ALLOW_HEADERS,
              "access-control-max-age": "86400",
            }
          : {};
        res.writeHead(204, preflight);
        res.end();
        return;
      }
      if (url.pathname === BASE_PATH || url.pathname.startsWith(`${BASE_PATH}/`)) {
        await forwardToAuth(auth, siteUrl, req, res, cors);
        return;
      }
      if (url.pathname === "/.well-known/openid-configuration" && req.method === "GET") {
        res.writeHead(302, {
          ...cors,
          location: `${siteUrl}${BASE_PATH}/convex/.well-known/openid-configuration`,
          "content-length": "0",
        });
        res.end();
        return;
      }
      if (url.pathname.startsWith("/test/") && handleTestRoute(url, req, res, cors, config)) {
        return;
      }
      sendJson(res, 404, { message: "Not found" }, cors);
    } catch (err) {
      // Log the error kind and message only; request bodies never reach the log.
      process.stderr.write(`request failed: ${err?.name ?? "Error"}: ${err?.message ?? err}\n`);
      if (!res.headersSent) {
        sendJson(res, 500, { message: "Internal server error" });
      } else {
        res.destroy();
      }
    }
  });

  // Keep-alive connections must not hold the process open on shutdown, and a slow
  // client must not stall the tests.
  server.keepAliveTimeout = 5000;

  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(config.port, "127.0.0.1", resolve);
  });
  const port = server.address().port;
  siteUrl = `http://127.0.0.1:${port}`;
  trusted = new Set([siteUrl, ...ALWAYS_TRUSTED, ...config.extraTrustedOrigins]);
  auth = buildAuth(config, siteUrl, [...trusted]);

  const startupMs = Math.round(performance.now());
  process.stdout.write(
    `listening on ${siteUrl} (jwt ttl ${config.jwtTtlSeconds}s, startup ${startupMs}ms)\n`,
  );
  process.stdout.write("ready\n");

  if (config.exitOnStdinEof) {
    process.stdin.on("end", () => process.exit(0));
    process.stdin.on("error", () => process.exit(0));
    process.stdin.resume();
  }
}

main().catch((err) => {
  fail(`startup failed: ${err?.stack ?? err}`);
});
