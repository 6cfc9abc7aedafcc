import { createHash } from 'node:crypto';
import { Queue, type Job } from 'bullmq';
import type { RedisClient } from '../queue/connection.js';
import { internalQueue } from '../queue/connection.js';
import type { JobHooks } from '../queue/job-hooks.js';
import { jobRetention, type Retention } from '../queue/retention.js';

/** The internal queue of webhook deliveries, `<queue>-webhooks`. */
export const webhookQueueName = (queue: string): string => internalQueue(queue, 'webhooks');

/** What a delivery job carries: the message, serialised once so every attempt signs the same bytes. */
export interface DeliveryData {
  /** `webhook-id`: the same on every attempt. */
  id: string;
  body: string;
}

/** The Standard Webhooks message of one job's end. */
export interface WebhookMessage {
  type: 'job.completed' | 'job.failed';
  /** When the job finished (ISO 8601). */
  timestamp: string;
  data: { queue: string; jobId: string; type: string; attemptsMade: number; result?: unknown; failedReason?: string };
}

/**
 * The stable `webhook-id` of one job's end: the same for whoever computes it, different for a job
 * id reused after removal (enqueue time) or a job that finishes again after a retry from the
 * dashboard (finish time). Also the delivery job's id, so it is queued at most once.
 */
export function webhookId(queue: string, job: Pick<Job, 'id' | 'timestamp' | 'finishedOn'>, kind: 'completed' | 'failed'): string {
  const h = createHash('sha256').update(`${queue}\n${job.id}\n${job.timestamp}\n${job.finishedOn ?? ''}\n${kind}`).digest('base64url');
  return `msg_${h.slice(0, 32)}`;
}

export interface PublisherOptions {
  queue: string;
  prefix: string;
  retention: Retention;
  /** Attempts per delivery: the retry schedule's length. */
  attempts: number;
}

/**
 * The producer side of webhooks, as job hooks of the worker that finished the job: each completion
 * and each final failure is queued once, by the one worker whose moveToFinished won, under a job id
 * that is its webhook-id. A failed add is the hook's failure (logged), never the job's.
 */
export class WebhookPublisher implements JobHooks {
  readonly queue: Queue<DeliveryData>;

  constructor(connection: RedisClient, private readonly o: PublisherOptions) {
    this.queue = new Queue<DeliveryData>(webhookQueueName(o.queue), {
      connection, prefix: o.prefix,
      defaultJobOptions: { attempts: o.attempts, backoff: { type: 'webhook' }, ...jobRetention(o.retention) },
    });
    this.queue.on('error', () => {});
  }

  async completed(job: Job, result: unknown): Promise<void> {
    await this.publish(job, 'completed', { result });
  }

  async failed(job: Job, err: Error): Promise<void> {
    await this.publish(job, 'failed', { failedReason: job.failedReason ?? err.message });
  }

  close(): Promise<void> {
    return this.queue.close();
  }

  private async publish(job: Job, kind: 'completed' | 'failed', detail: { result?: unknown; failedReason?: string }): Promise<void> {
    const id = webhookId(this.o.queue, job, kind);
    const message: WebhookMessage = {
      type: `job.${kind}`,
      timestamp: new Date(job.finishedOn ?? Date.now()).toISOString(),
      data: { queue: this.o.queue, jobId: String(job.id), type: job.name, attemptsMade: job.attemptsMade, ...detail },
    };
    await this.queue.add(kind, { id, body: JSON.stringify(message) }, { jobId: id });
  }
}
