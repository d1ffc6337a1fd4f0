// Benchmark driver for the official npm `convex` ConvexClient (from `convex/browser`).
//
// Run by tests/benchmarks as `node npm_driver.mjs <install dir>`, where <install dir> is
// the cached `npm ci` made by tests/conformance/_npm.py (the same package the conformance
// tests drive). Requests arrive as JSON lines on stdin; answers go to stdout as one line
// "@@bench " + JSON each:
//
//   {"op":"rt_open","url","token","kind":"mutation"|"query","warm"} -> {}: a client for
//       round trips, connected, authenticated and warmed by `warm` untimed calls
//   {"op":"rt_block","n"} -> {"latencies":[microseconds]}: the next n sequential calls on
//       it (the harness interleaves blocks of the contenders)
//   {"op":"rt_close"} -> {}: close that client
//   {"op":"feed","url","size","n"} -> {"elapsed","seen","final_seq"}
//
// Every rt_open and feed uses a fresh client, closed afterwards. The client's own
// logging goes to stderr.

import { createRequire } from "node:module";
import path from "node:path";
import readline from "node:readline";

const MARK = "@@bench ";
const log = (...parts) => process.stderr.write(parts.map(String).join(" ") + "\n");
console.log = log;
console.info = log;
console.debug = log;
console.warn = log;

const installDir = process.argv[2];
const require = createRequire(path.join(installDir, "package.json"));
const { ConvexClient } = require("convex/browser");
const { makeFunctionReference } = require("convex/server");

const MUT = makeFunctionReference("bench:mut");
const GET = makeFunctionReference("bench:get");
const PING = makeFunctionReference("bench:ping");
const FEED = makeFunctionReference("bench:feed");

function emit(payload) {
  process.stdout.write(MARK + JSON.stringify(payload) + "\n");
}

let openRt = null;

async function rtOpen(request) {
  const client = new ConvexClient(request.url);
  client.setAuth(async () => request.token);
  const isMutation = request.kind === "mutation";
  const call = (i) =>
    isMutation ? client.mutation(MUT, { n: i }) : client.query(GET, { n: i });
  const warm = Math.max(1, request.warm ?? 1);
  for (let i = 0; i < warm; i++) await call(-1 - i); // connected and authenticated first
  openRt = { client, call, next: 0 };
  return {};
}

async function rtBlock(request) {
  if (openRt === null) throw new Error("rt_block before rt_open");
  const { call } = openRt;
  const latencies = [];
  const end = openRt.next + request.n;
  for (let i = openRt.next; i < end; i++) {
    const started = process.hrtime.bigint();
    await call(i);
    latencies.push(Number(process.hrtime.bigint() - started) / 1000);
  }
  openRt.next = end;
  return { latencies };
}

async function rtClose() {
  if (openRt !== null) await openRt.client.close();
  openRt = null;
  return {};
}

async function feed(request) {
  const client = new ConvexClient(request.url);
  const n = request.n;
  await new Promise((resolve) => {
    const stop = client.onUpdate(PING, {}, () => {
      resolve();
    });
    void stop;
  });
  const started = process.hrtime.bigint();
  const result = await new Promise((resolve, reject) => {
    let seen = 0;
    client.onUpdate(
      FEED,
      { size: request.size, n },
      (value) => {
        seen += 1;
        if (value.seq === n - 1) {
          const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
          resolve({ elapsed, seen, final_seq: value.seq });
        }
      },
      (error) => reject(error),
    );
  });
  await client.close();
  return result;
}

const rl = readline.createInterface({ input: process.stdin });
emit({ ready: true });
let queue = Promise.resolve();
rl.on("line", (line) => {
  if (!line.trim()) return;
  queue = queue.then(async () => {
    const request = JSON.parse(line);
    try {
      if (request.op === "rt_open") emit(await rtOpen(request));
      else if (request.op === "rt_block") emit(await rtBlock(request));
      else if (request.op === "rt_close") emit(await rtClose());
      else if (request.op === "feed") emit(await feed(request));
      else emit({ error: `unknown op ${request.op}` });
    } catch (error) {
      emit({ error: String(error?.stack ?? error) });
    }
  });
});
rl.on("close", () => {
  queue.then(() => process.exit(0));
});
