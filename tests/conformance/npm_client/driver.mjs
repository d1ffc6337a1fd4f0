// Conformance driver for the official npm `convex` ConvexClient (from `convex/browser`).
//
// Run by tests/conformance/test_conformance.py as
//     node driver.mjs <install dir>
// with the scenario in the CONFORMANCE_CONFIG environment variable (JSON:
// {"url", "token", "listArgs", "actArgs"}, the args in Convex JSON). <install dir> is the
// cached `npm ci` of ./package.json + ./package-lock.json; the package is loaded from there
// with createRequire, so this file never has to be copied next to node_modules.
//
// The scenario is the same one the Python drivers run (keep the three in step):
//   setAuth -> subscribe list -> mutation "one" -> action -> one-shot query whoami ->
//   mutation "two" (the test drops every socket while the server runs it) ->
//   mutation "three" -> action again -> unsubscribe + subscribe list again -> done.
//
// Every observation goes to stdout as one line: "@@conformance " + JSON. Values are
// printed in Convex JSON (convexToJson) so $integer/$bytes/$float survive. Anything the
// client logs goes to stderr.

import { createRequire } from "node:module";
import path from "node:path";

const MARK = "@@conformance ";
const log = (...parts) => process.stderr.write(parts.map(String).join(" ") + "\n");
console.log = log;
console.info = log;
console.debug = log;

function emit(event) {
  process.stdout.write(MARK + JSON.stringify(event) + "\n");
}

const installDir = process.argv[2];
const config = JSON.parse(process.env.CONFORMANCE_CONFIG ?? "{}");
const require = createRequire(path.join(installDir, "package.json"));
const { ConvexClient } = require("convex/browser");
const { convexToJson, jsonToConvex } = require("convex/values");
const { makeFunctionReference } = require("convex/server");

const LIST = makeFunctionReference("conformance:list");
const SEND = makeFunctionReference("conformance:send");
const ACT = makeFunctionReference("conformance:act");
const WHOAMI = makeFunctionReference("conformance:whoami");

// A watchdog: the test kills us on its own timeout too, this only leaves a clearer trace.
setTimeout(() => {
  emit({ event: "fatal", message: "npm driver watchdog expired" });
  process.exit(3);
}, 60_000).unref();

/** Updates of one onUpdate subscription, in callback order; waiters ask for a predicate. */
class Updates {
  constructor(label) {
    this.label = label;
    this.values = [];
    this.waiters = [];
  }
  push(value) {
    const json = convexToJson(value);
    this.values.push(json);
    emit({ event: "update", sub: this.label, value: json });
    this.waiters = this.waiters.filter((w) => !w.check());
  }
  fail(error) {
    emit({ event: "update-error", sub: this.label, message: String(error?.message ?? error) });
  }
  until(predicate) {
    return new Promise((resolve) => {
      const check = () => {
        const last = this.values[this.values.length - 1];
        if (last !== undefined && predicate(last)) {
          resolve(last);
          return true;
        }
        return false;
      };
      if (!check()) this.waiters.push({ check });
    });
  }
}

// The list's bodies end with `expected` (a client that applies a re-sent mutation twice
// still gets through the scenario; the test judges the values it printed).
const bodiesEnd =
  (...expected) =>
  (value) =>
    JSON.stringify(value.bodies.slice(value.bodies.length - expected.length)) ===
    JSON.stringify(expected);

async function step(name, fn) {
  try {
    const value = await fn();
    emit({ event: "result", step: name, value: convexToJson(value ?? null) });
  } catch (error) {
    emit({ event: "error", step: name, message: String(error?.message ?? error) });
    throw error;
  }
}

async function main() {
  const listArgs = jsonToConvex(config.listArgs);
  const channel = listArgs.channel;
  const client = new ConvexClient(config.url);
  client.setAuth(async () => config.token);

  const list = new Updates("list");
  let unsubscribe = client.onUpdate(LIST, listArgs, (v) => list.push(v), (e) => list.fail(e));
  await list.until(bodiesEnd());
  emit({ event: "subscribed" });

  await step("send-one", () => client.mutation(SEND, { channel, body: "one" }));
  await list.until(bodiesEnd("one"));
  await step("act-1", () => client.action(ACT, jsonToConvex(config.actArgs)));
  await step("whoami", () => client.query(WHOAMI, {}));
  // The test drops every socket while the server runs this one (it waits on a gate).
  await step("send-two", () => client.mutation(SEND, { channel, body: "two", gated: true }));
  await list.until(bodiesEnd("two"));
  await step("send-three", () => client.mutation(SEND, { channel, body: "three" }));
  await list.until(bodiesEnd("three"));
  await step("act-2", () => client.action(ACT, { x: 2 }));

  unsubscribe();
  const again = new Updates("list-again");
  unsubscribe = client.onUpdate(LIST, listArgs, (v) => again.push(v), (e) => again.fail(e));
  await again.until(() => true);
  unsubscribe();
  await client.close();
  emit({ event: "done" });
}

main().then(
  () => process.exit(0),
  (error) => {
    emit({ event: "fatal", message: String(error?.stack ?? error) });
    process.exit(1);
  },
);
