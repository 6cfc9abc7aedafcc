import { Registry, type Metric } from 'prom-client';
import type { Queue } from 'bullmq';
import { METRICS, type Labels, type MetricName } from './catalog.js';

interface Sample { labels: Labels; value: number; metricName?: string }

/**
 * The workers' totals (one HGETALL of the metrics hash) as Prometheus text, through prom-client's
 * own registry and formatter: label escaping, HELP/TYPE lines. Histogram buckets are stored one per
 * bound and made cumulative here, `+Inf` being the count.
 */
export async function renderTotals(hash: Record<string, string>): Promise<string> {
  const samples = new Map<MetricName, Map<string, { labels: Labels; parts: Map<string, number> }>>();
  for (const [f, v] of Object.entries(hash)) {
    let parsed: unknown;
    try { parsed = JSON.parse(f); } catch { continue; }
    if (!Array.isArray(parsed) || parsed.length !== 3) continue;
    const [name, labels, part] = parsed as [MetricName, Labels, string];
    if (!(name in METRICS)) continue;
    const byLabels = samples.get(name) ?? new Map();
    samples.set(name, byLabels);
    const k = JSON.stringify(Object.entries(labels).sort(([a], [b]) => a.localeCompare(b)));
    const s = byLabels.get(k) ?? { labels, parts: new Map<string, number>() };
    byLabels.set(k, s);
    s.parts.set(part, (s.parts.get(part) ?? 0) + Number(v));
  }
  const registry = new Registry();
  for (const [name, def] of Object.entries(METRICS) as Array<[MetricName, (typeof METRICS)[MetricName]]>) {
    const values: Sample[] = [];
    const series = [...(samples.get(name)?.values() ?? [])];
    // A metric without labels reads 0 before its first count, so a rate() has a start.
    if (!series.length && !def.labels.length) series.push({ labels: {}, parts: new Map() });
    for (const s of series) {
      if (def.kind === 'counter') {
        values.push({ labels: s.labels, value: s.parts.get('') ?? 0 });
        continue;
      }
      let cumulative = 0;
      for (const b of def.buckets) {
        cumulative += s.parts.get(String(b)) ?? 0;
        values.push({ labels: { ...s.labels, le: String(b) }, value: cumulative, metricName: `${name}_bucket` });
      }
      const count = s.parts.get('count') ?? 0;
      values.push({ labels: { ...s.labels, le: '+Inf' }, value: count, metricName: `${name}_bucket` });
      values.push({ labels: s.labels, value: s.parts.get('sum') ?? 0, metricName: `${name}_sum` });
      values.push({ labels: s.labels, value: count, metricName: `${name}_count` });
    }
    const snapshot = { name, help: def.help, type: def.kind, values, aggregator: 'sum' as const };
    registry.registerMetric({ ...snapshot, get: () => snapshot } as unknown as Metric);
  }
  return registry.metrics();
}

/**
 * BullMQ's `exportPrometheusMetrics` of several queues as one block: each metric's HELP and TYPE
 * once (a strict parser refuses them twice), every queue's samples under it, ending in the newline
 * BullMQ leaves off.
 */
export async function renderQueues(queues: readonly Queue[]): Promise<string> {
  const texts = await Promise.all(queues.map((q) => q.exportPrometheusMetrics()));
  const order: string[] = [];
  const blocks = new Map<string, { head: string[]; samples: string[] }>();
  for (const text of texts) {
    let current: { head: string[]; samples: string[] } | undefined;
    for (const line of text.split('\n')) {
      if (!line.trim()) continue;
      const meta = /^# (HELP|TYPE) (\S+)/.exec(line);
      const name = meta ? meta[2]! : /^([a-zA-Z_:][a-zA-Z0-9_:]*)/.exec(line)?.[1];
      if (!name) continue;
      let block = blocks.get(name);
      if (!block) {
        block = { head: [], samples: [] };
        blocks.set(name, block);
        order.push(name);
      }
      current = block;
      if (meta) {
        if (!current.head.some((h) => h.startsWith(`# ${meta[1]} `))) current.head.push(line);
      } else {
        // BullMQ writes `{queue="q", state="s"}`; the exposition format has no spaces there.
        current.samples.push(line.replace(/", /g, '",'));
      }
    }
  }
  return order.map((n) => [...blocks.get(n)!.head, ...blocks.get(n)!.samples].join('\n')).join('\n') + '\n';
}
