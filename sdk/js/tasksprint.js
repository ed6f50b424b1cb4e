'use strict';
/**
 * TaskSprint node SDK for JavaScript (Node.js >= 18, CommonJS, no dependencies).
 *
 * A node is a long-lived process that the TaskSprint client drives over its
 * stdin and stdout with JSON lines (the node stdio protocol, version 1,
 * docs/protocol.md). Subclass Node, add one method per task, call start():
 *
 *   const { Node } = require('./tasksprint');
 *   class MyNode extends Node {
 *     square(x) { return { result: x * x }; }
 *   }
 *   new MyNode().start();
 *
 * A task method is called as method(...inputs, ...args), plus a final
 * kwargs object when the task has keyword arguments (JavaScript has no
 * keyword arguments, and appending {} always would break variadic methods
 * such as sum(...values)). It returns (or resolves to) an object of outputs.
 *
 * Stdout belongs to the protocol: while start() runs, everything else written
 * to process.stdout (console.log included) goes to stderr, the node's log.
 */

const PROTOCOL_VERSION = 1;
const TIMEOUT_SCALE_ENV = 'TASKSPRINT_TIMEOUT_SCALE';
// How much of a bad client line to quote in the node's log.
const QUOTE_CHARS = 200;
// Instance properties of Node that are not tasks (methods of Node.prototype are excluded too).
const RESERVED = new Set(['random']);

/** Raised by timeout() when the time is up. */
class TimeoutError extends Error {
  constructor(message) {
    super(message);
    this.name = 'TimeoutError';
  }
}

/**
 * A deterministic generator of floats in [0, 1) for one seed (splitmix32
 * for seeding, mulberry32 for drawing): the same seed gives the same numbers
 * on every machine. Seeds are integers; those below 2**53 are read exactly.
 * @param {number} seed
 * @returns {() => number}
 */
function makeRandom(seed) {
  const TWO32 = 4294967296;
  const value = Number.isFinite(seed) ? Math.trunc(seed) : 0;
  const low = ((value % TWO32) + TWO32) % TWO32;
  const high = Math.floor(value / TWO32);
  // Mix both halves so that seeds differing only above bit 32 still differ.
  let state = mix32((low ^ mix32(high >>> 0)) >>> 0);
  return function random() {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / TWO32;
  };
}

function mix32(x) {
  let z = (x + 0x9e3779b9) >>> 0;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
  return (z ^ (z >>> 16)) >>> 0;
}

function timeoutScale() {
  const raw = (process.env[TIMEOUT_SCALE_ENV] || '').trim();
  if (raw === '') return 1;
  const scale = Number(raw);
  if (!(scale > 0) || !Number.isFinite(scale)) {
    throw new RangeError(
      `${TIMEOUT_SCALE_ENV}=${JSON.stringify(raw)} is not a positive number; set it to a factor such as 0.1 or unset it`);
  }
  return scale;
}

/**
 * Run fn with a time limit.
 *
 * fn receives a `limit` with `limit.expired()` (true once the time is up)
 * and `limit.signal` (an AbortSignal that aborts then, for APIs such as
 * fetch). JavaScript cannot interrupt a synchronous loop, so a long
 * computation checks limit.expired() as it goes; asynchronous work is simply
 * awaited. The limit is multiplied by the TASKSPRINT_TIMEOUT_SCALE
 * environment variable (default 1).
 *
 * @param {number} ms the limit in milliseconds, > 0
 * @param {(limit: {expired: () => boolean, signal: AbortSignal}) => any} fn
 * @returns {Promise<any>} fn's result; rejects with TimeoutError when the time
 *   is up first, or when fn returned only after the limit had passed
 * @throws {RangeError} ms is not a positive number, or the scale is malformed
 */
async function timeout(ms, fn) {
  if (!(typeof ms === 'number' && ms > 0 && Number.isFinite(ms))) {
    throw new RangeError(`timeout(ms, fn) needs a positive number of milliseconds, got ${ms}`);
  }
  const duration = ms * timeoutScale();
  const deadline = performance.now() + duration;
  const controller = new AbortController();
  const limit = { expired: () => performance.now() >= deadline, signal: controller.signal };
  const expired = () => new TimeoutError(`${fn.name || 'function'} ran longer than its timeout of ${duration} ms`);
  let timer;
  const alarm = new Promise((resolve, reject) => {
    timer = setTimeout(() => {
      controller.abort();
      reject(expired());
    }, duration);
  });
  try {
    const result = await Promise.race([Promise.resolve().then(() => fn(limit)), alarm]);
    // A synchronous fn keeps the timer from firing; an overrun is an overrun all the same.
    if (limit.expired()) throw expired();
    return result;
  } finally {
    clearTimeout(timer);
  }
}

function quote(text) {
  return JSON.stringify(text.length > QUOTE_CHARS ? `${text.slice(0, QUOTE_CHARS)}...` : text);
}

function log(text) {
  process.stderr.write(`tasksprint node: ${text}\n`);
}

function isInt(value) {
  return Number.isInteger(value);
}

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

function describe(error) {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  try {
    return `thrown value: ${JSON.stringify(error)}`;
  } catch (_) {
    return `thrown value: ${String(error)}`;
  }
}

/** Base class of a JavaScript node: each public method is a task of that name. */
class Node {
  constructor() {
    /** Deterministic floats in [0, 1), reseeded from each task's seed. */
    this.random = makeRandom(0);
  }

  /**
   * Serve tasks on stdin/stdout until the client sends {"type": "exit"} or
   * closes stdin, then exit the process with status 0.
   * @returns {Promise<void>} settles only if the process is not exited
   */
  async start() {
    const stdout = process.stdout;
    const protocolWrite = stdout.write.bind(stdout);
    // Everything but protocol lines goes to the log, so no stray output can corrupt the protocol.
    stdout.write = (...args) => process.stderr.write(...args);
    const send = (message) => protocolWrite(`${JSON.stringify(message)}\n`);

    send({ type: 'ready', protocol: PROTOCOL_VERSION, sdk: 'js' });
    process.stdin.setEncoding('utf8');
    let buffered = '';
    let exiting = false;
    for await (const chunk of process.stdin) {
      buffered += chunk;
      let end;
      while (!exiting && (end = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, end).trim();
        buffered = buffered.slice(end + 1);
        if (line === '') continue;
        let message;
        try {
          message = JSON.parse(line);
        } catch (_) {
          log(`ignoring a line from the client that is not JSON: ${quote(line)}`);
          continue;
        }
        const type = isPlainObject(message) ? message.type : undefined;
        if (type === 'exit') {
          exiting = true;
        } else if (type === 'task') {
          const answer = await this._answer(message, line);
          if (answer !== null) send(answer);
        } else {
          log(`ignoring a line from the client that is not a task: ${quote(line)}`);
        }
      }
      if (exiting) break;
    }
    // Exit explicitly: timers a task left behind must not keep the node alive.
    protocolWrite('', () => process.exit(0));
  }

  async _answer(message, line) {
    const { id, attempt } = message;
    if (!isInt(id) || !isInt(attempt)) {
      log(`ignoring a task without an integer id and attempt: ${quote(line)}`);
      return null;
    }
    const fail = (error, traceback = '') => ({ type: 'error', id, attempt, error, traceback });
    const { name, inputs = [], args = [], kwargs = {}, seed = 0 } = message;
    if (typeof name !== 'string') return fail(`malformed task message: name must be a string, got ${JSON.stringify(name)}`);
    if (!Array.isArray(inputs)) return fail('malformed task message: inputs must be a list');
    if (!Array.isArray(args)) return fail('malformed task message: args must be a list');
    if (!isPlainObject(kwargs)) return fail('malformed task message: kwargs must be an object');
    if (!isInt(seed)) return fail(`malformed task message: seed must be an integer, got ${JSON.stringify(seed)}`);
    // Names of the base class (and of Object) are the SDK's own, never tasks.
    if (name.startsWith('_') || RESERVED.has(name) || name in Node.prototype || typeof this[name] !== 'function') {
      return fail(`unknown task ${name}`);
    }

    this.random = makeRandom(seed);
    const callArgs = [...inputs, ...args];
    if (Object.keys(kwargs).length > 0) callArgs.push(kwargs);
    let outputs;
    try {
      outputs = await this[name](...callArgs);
    } catch (error) {
      return fail(describe(error), error instanceof Error && error.stack ? error.stack : '');
    }
    if (!isPlainObject(outputs)) {
      const got = outputs === null ? 'null' : Array.isArray(outputs) ? 'array' : typeof outputs;
      return fail(`task ${name} must return an object of outputs, got ${got}`);
    }
    try {
      // Values JSON cannot hold (BigInt, cycles) are reported here, not thrown from send().
      JSON.stringify(outputs);
    } catch (error) {
      return fail(`task ${name} returned outputs that are not JSON: ${describe(error)}`);
    }
    return { type: 'result', id, attempt, outputs };
  }
}

module.exports = { Node, timeout, TimeoutError, makeRandom, PROTOCOL_VERSION };
