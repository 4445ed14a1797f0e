import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { LoopGroup, LoopingCall, Manager, periodicTask, RequestContext } from "../index.ts";
import { MemoryLogger, sleep, waitFor } from "./helpers.ts";

describe("LoopingCall", () => {
  it("LoopingCall runs every interval, timed from each run's start", async () => {
    const starts: number[] = [];
    const loop = new LoopingCall(async () => {
      starts.push(Date.now());
      await sleep(20); // the run's own time is inside the interval, not added to it
    }, { logger: new MemoryLogger() }).start({ interval: 0.05 });
    await waitFor(() => starts.length >= 5, "five runs");
    loop.stop();
    await loop.done;
    const gaps = starts.slice(1).map((t, i) => t - starts[i]!);
    const mean = gaps.reduce((a, b) => a + b, 0) / gaps.length;
    assert.ok(mean >= 45 && mean < 65, `mean gap ${mean} ms for a 50 ms interval`);
  });

  it("LoopingCall never overlaps itself and logs a run longer than the interval", async () => {
    const log = new MemoryLogger();
    let running = 0;
    let maxRunning = 0;
    let runs = 0;
    const loop = new LoopingCall(async () => {
      running++;
      maxRunning = Math.max(maxRunning, running);
      await sleep(40);
      running--;
      runs++;
    }, { name: "slow", logger: log }).start({ interval: 0.01 });
    await waitFor(() => runs >= 3, "three runs");
    loop.stop();
    await loop.done;
    assert.equal(maxRunning, 1);
    assert.ok(log.has("warn", /Loop slow run took \d+ ms, longer than its interval of 10 ms/));
    const said = log.lines.filter((l) => /longer than its interval/.test(l.msg)).length;
    assert.equal(said, 1, "once for a streak of late runs");
  });

  it("LoopingCall logs an error and goes on; with stopOnError it stops and done rejects", async () => {
    const log = new MemoryLogger();
    let runs = 0;
    const loop = new LoopingCall(() => {
      runs++;
      throw new Error("flaky (expected by the test)");
    }, { name: "flaky", logger: log }).start({ interval: 0.005 });
    await waitFor(() => runs >= 3, "three runs despite errors");
    loop.stop();
    await loop.done;
    assert.ok(log.has("error", /Loop flaky failed/));

    let once = 0;
    const strict = new LoopingCall(() => {
      once++;
      throw new Error("fatal (expected by the test)");
    }, { logger: log, stopOnError: true }).start({ interval: 0.005 });
    await assert.rejects(strict.done, /fatal/);
    await sleep(20);
    assert.equal(once, 1);
  });

  it("LoopingCall.stop() cancels the wait at once and done waits for the run in progress", async () => {
    let finished = false;
    const loop = new LoopingCall(async () => {
      await sleep(50);
      finished = true;
    }, { logger: new MemoryLogger() }).start({ interval: 3600 });
    await sleep(10);
    const t0 = Date.now();
    loop.stop();
    await loop.done;
    assert.equal(finished, true);
    assert.ok(Date.now() - t0 < 1000, "did not wait for the hour-long interval");
    const idle = new LoopingCall(() => {}, { logger: new MemoryLogger() }).start({
      interval: 3600,
      initialDelay: 3600,
    });
    idle.stop();
    await idle.done; // resolves although the first run was an hour away
  });

  it("LoopingCall.start() refuses bad intervals and a second start", () => {
    const loop = new LoopingCall(() => {});
    assert.throws(() => loop.start({ interval: 0 }), RangeError);
    assert.throws(() => loop.start({ interval: 1, initialDelay: -1 }), RangeError);
    loop.start({ interval: 1, initialDelay: 10 });
    assert.throws(() => loop.start({ interval: 1 }), /already started/);
    loop.stop();
  });
});

describe("LoopGroup", () => {
  it("LoopGroup.stop() stops the loops and waits for tracked work, within the graceful time", async () => {
    const g = new LoopGroup();
    let ticks = 0;
    g.addTimer(() => void ticks++, { interval: 0.01, logger: new MemoryLogger() });
    let done = false;
    g.track(sleep(50).then(() => (done = true)));
    assert.equal(await g.stop(5), true);
    assert.equal(done, true);
    const after = ticks;
    await sleep(30);
    assert.equal(ticks, after, "no tick after stop()");
  });

  it("LoopGroup.stop() gives up after the graceful time and says so", async () => {
    const g = new LoopGroup();
    g.track(new Promise(() => {})); // never ends
    const t0 = Date.now();
    assert.equal(await g.stop(0.05), false);
    assert.ok(Date.now() - t0 < 1000);
  });
});

describe("periodic tasks", () => {
  const ctx = new RequestContext();

  it("periodicTasks() runs a task at every tick by default, and by its spacing otherwise", async () => {
    const runs: string[] = [];
    class M extends Manager {
      @periodicTask()
      every(_c: RequestContext) {
        runs.push("every");
      }
      @periodicTask({ spacing: 10 })
      spaced(_c: RequestContext) {
        runs.push("spaced");
      }
    }
    const m = new M();
    await m.periodicTasks(ctx, 0);
    await m.periodicTasks(ctx, 5_000);
    await m.periodicTasks(ctx, 10_000);
    assert.deepEqual(runs, ["every", "spaced", "every", "every", "spaced"]);
  });

  it("periodicTasks() waits one spacing first for runImmediately: false", async () => {
    const runs: number[] = [];
    class M extends Manager {
      @periodicTask({ spacing: 60, runImmediately: false })
      late(_c: RequestContext) {
        runs.push(1);
      }
    }
    const m = new M();
    await m.periodicTasks(ctx, 1_000);
    await m.periodicTasks(ctx, 60_999);
    assert.deepEqual(runs, []);
    await m.periodicTasks(ctx, 61_000);
    assert.deepEqual(runs, [1]);
  });

  it("a slow task never runs twice at once and does not hold back the others", async () => {
    let slowRunning = 0;
    let slowMax = 0;
    let fast = 0;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    class M extends Manager {
      @periodicTask()
      async slow(_c: RequestContext) {
        slowRunning++;
        slowMax = Math.max(slowMax, slowRunning);
        await gate;
        slowRunning--;
      }
      @periodicTask()
      quick(_c: RequestContext) {
        fast++;
      }
    }
    const m = new M();
    const first = m.periodicTasks(ctx, 0); // starts both; slow blocks on the gate
    await sleep(1);
    for (let t = 1; t <= 3; t++) await m.periodicTasks(ctx, t * 1000); // slow is still running: skipped
    assert.equal(fast, 4, "the quick task ran at every tick");
    assert.equal(slowMax, 1);
    release();
    await first;
    await m.periodicTasks(ctx, 5_000);
    assert.equal(slowMax, 1);
  });

  it("a failing task is logged, does not stop the others, and runs again at its next slot", async () => {
    let failures = 0;
    let ok = 0;
    class M extends Manager {
      @periodicTask()
      broken(_c: RequestContext) {
        failures++;
        throw new Error("disk full (expected by the test)");
      }
      @periodicTask()
      fine(_c: RequestContext) {
        ok++;
      }
    }
    const m = new M();
    await m.periodicTasks(ctx, 0);
    await m.periodicTasks(ctx, 1);
    assert.equal(failures, 2);
    assert.equal(ok, 2);
  });
});
