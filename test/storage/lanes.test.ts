import { describe, expect, it } from 'vitest';
import { Lanes } from '../../src/storage/lanes.js';

const tick = () => new Promise((r) => setImmediate(r));

describe('Lanes', () => {
  it('runs at most its size at once and waits for a free lane', async () => {
    const lanes = new Lanes(2);
    const gates: Array<() => void> = [];
    let running = 0;
    let most = 0;
    const task = () => new Promise<void>((resolve) => { running++; most = Math.max(most, running); gates.push(() => { running--; resolve(); }); });
    await lanes.start(task);
    await lanes.start(task);
    let third = false;
    const starting = lanes.start(task).then(() => { third = true; });
    await tick();
    expect(third).toBe(false); // both lanes busy
    gates.shift()!();
    await starting;
    expect(third).toBe(true);
    gates.splice(0).forEach((g) => g());
    await lanes.finish();
    expect(most).toBe(2);
  });

  it('starts nothing after a failure, and finish throws it once the running tasks settled', async () => {
    const lanes = new Lanes(2);
    let release!: () => void;
    let slowDone = false;
    await lanes.start(() => new Promise<void>((r) => { release = () => { slowDone = true; r(); }; }));
    await lanes.start(async () => { throw new Error('EIO'); });
    await tick();
    let ran = false;
    await expect(lanes.start(async () => { ran = true; })).rejects.toThrow('EIO');
    expect(ran).toBe(false);
    const finishing = lanes.finish();
    await tick();
    release();
    await expect(finishing).rejects.toThrow('EIO');
    expect(slowDone).toBe(true);
  });
});
