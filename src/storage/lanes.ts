/**
 * Bounded concurrency with a first-failure stop: at most `size` tasks run at once, and once one
 * fails no new task starts. Used for S3 part uploads and copies, and for the fsyncs of extracted
 * files, which run beside the work that produces them.
 */
export class Lanes {
  private readonly running = new Set<Promise<void>>();
  private failure: { err: unknown } | undefined;

  constructor(private readonly size: number) {}

  /** Waits for a free lane and starts `task`; throws the first failure instead, once there is one. */
  async start(task: () => Promise<void>): Promise<void> {
    while (this.running.size >= this.size && !this.failure) await Promise.race(this.running);
    if (this.failure) throw this.failure.err;
    const run: Promise<void> = task()
      .catch((err: unknown) => { this.failure ??= { err }; })
      .finally(() => this.running.delete(run));
    this.running.add(run);
  }

  /** Waits for every started task, whatever happened. */
  async settle(): Promise<void> {
    await Promise.all(this.running);
  }

  /** Waits for every started task and throws the first failure. */
  async finish(): Promise<void> {
    await this.settle();
    if (this.failure) throw this.failure.err;
  }
}

/**
 * Runs the tasks `next` hands out, up to `lanes` at once, and returns when all have finished.
 * `next` prepares its task (a part buffer is filled) while the lanes are busy, so preparing and
 * running overlap; it returns undefined when there is no more. The first failure, of a task or of
 * `next`, stops new tasks and is thrown once the running ones have settled.
 */
export async function inLanes(size: number, next: () => Promise<(() => Promise<void>) | undefined>): Promise<void> {
  const lanes = new Lanes(size);
  try {
    for (let task = await next(); task; task = await next()) await lanes.start(task);
  } finally {
    await lanes.settle();
  }
  await lanes.finish();
}
