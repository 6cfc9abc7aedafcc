/**
 * A strict reader of the Prometheus text exposition format (0.0.4), failing on anything a
 * Prometheus server would refuse or that the format's rules forbid: a sample before its TYPE, a
 * second HELP/TYPE, a metric's samples split apart, bad names or label syntax, duplicate series,
 * non-cumulative or incomplete histograms, a missing final newline.
 */
export interface Series { name: string; labels: Record<string, string>; value: number }
export interface Family { name: string; type: string; help: string; samples: Series[] }

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

function parseLabels(s: string, line: string): Record<string, string> {
  const out: Record<string, string> = {};
  let i = 0;
  while (i < s.length) {
    const eq = s.indexOf('=', i);
    if (eq < 0) throw new Error(`bad labels in: ${line}`);
    const name = s.slice(i, eq);
    if (!LABEL.test(name)) throw new Error(`bad label name "${name}" in: ${line}`);
    if (s[eq + 1] !== '"') throw new Error(`unquoted label value in: ${line}`);
    let j = eq + 2;
    let v = '';
    for (; j < s.length && s[j] !== '"'; j++) {
      if (s[j] === '\\') {
        const n = s[++j];
        if (n === 'n') v += '\n'; else if (n === '\\' || n === '"') v += n; else throw new Error(`bad escape in: ${line}`);
      } else v += s[j];
    }
    if (s[j] !== '"') throw new Error(`unterminated label value in: ${line}`);
    if (name in out) throw new Error(`label "${name}" twice in: ${line}`);
    out[name] = v;
    i = j + 1;
    if (i < s.length) {
      if (s[i] !== ',') throw new Error(`expected "," between labels in: ${line}`);
      i++;
    }
  }
  return out;
}

function familyOf(sample: string, families: Map<string, Family>): Family | undefined {
  if (families.has(sample)) return families.get(sample);
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (sample.endsWith(suffix)) {
      const f = families.get(sample.slice(0, -suffix.length));
      if (f && (f.type === 'histogram' || f.type === 'summary')) return f;
    }
  }
  return undefined;
}

export function parsePrometheus(text: string): Map<string, Family> {
  if (!text.endsWith('\n')) throw new Error('exposition does not end with a newline');
  const families = new Map<string, Family>();
  const seen = new Set<string>();
  const closed = new Set<string>();
  let current: Family | undefined;
  for (const line of text.slice(0, -1).split('\n')) {
    if (line === '') continue;
    const meta = /^# (HELP|TYPE) (\S+)(?: (.*))?$/.exec(line);
    if (meta) {
      const [, kind, name, rest = ''] = meta;
      if (!NAME.test(name!)) throw new Error(`bad metric name: ${line}`);
      let f = families.get(name!);
      if (f && closed.has(name!)) throw new Error(`metric ${name} appears in two places`);
      if (!f) {
        if (current) closed.add(current.name);
        f = { name: name!, type: '', help: '', samples: [] };
        families.set(name!, f);
      }
      if (kind === 'TYPE') {
        if (f.type) throw new Error(`second TYPE for ${name}`);
        if (f.samples.length) throw new Error(`TYPE after samples for ${name}`);
        if (!TYPES.has(rest)) throw new Error(`unknown type: ${line}`);
        f.type = rest;
      } else {
        if (f.help) throw new Error(`second HELP for ${name}`);
        f.help = rest || ' ';
      }
      current = f;
      continue;
    }
    if (line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: (-?\d+))?$/.exec(line);
    if (!m) throw new Error(`bad sample line: ${line}`);
    const [, name, labelText = '', raw] = m;
    const f = familyOf(name!, families);
    if (!f || !f.type) throw new Error(`sample before its TYPE: ${line}`);
    if (f !== current) throw new Error(`samples of ${f.name} are not together: ${line}`);
    const value = raw === '+Inf' ? Infinity : raw === '-Inf' ? -Infinity : raw === 'NaN' ? NaN : Number(raw);
    if (!/^[-+]?(\d+\.?\d*(e[-+]?\d+)?|\.\d+|Inf|NaN)$/i.test(raw!) || (Number.isNaN(value) && raw !== 'NaN')) throw new Error(`bad value: ${line}`);
    const labels = parseLabels(labelText, line);
    const id = `${name}${JSON.stringify(Object.entries(labels).sort())}`;
    if (seen.has(id)) throw new Error(`duplicate series: ${line}`);
    seen.add(id);
    if (f.type === 'counter' && value < 0) throw new Error(`negative counter: ${line}`);
    f.samples.push({ name: name!, labels, value });
  }
  for (const f of families.values()) if (f.type === 'histogram') checkHistogram(f);
  return families;
}

function checkHistogram(f: Family): void {
  const groups = new Map<string, Series[]>();
  const key = (l: Record<string, string>) => JSON.stringify(Object.entries(l).filter(([k]) => k !== 'le').sort());
  for (const s of f.samples) groups.set(key(s.labels), [...(groups.get(key(s.labels)) ?? []), s]);
  for (const [k, ss] of groups) {
    const buckets = ss.filter((s) => s.name === `${f.name}_bucket`);
    const count = ss.find((s) => s.name === `${f.name}_count`);
    const sum = ss.find((s) => s.name === `${f.name}_sum`);
    if (!count || !sum) throw new Error(`histogram ${f.name}${k} lacks _count or _sum`);
    const inf = buckets.find((b) => b.labels.le === '+Inf');
    if (!inf) throw new Error(`histogram ${f.name}${k} lacks le="+Inf"`);
    if (inf.value !== count.value) throw new Error(`histogram ${f.name}${k}: +Inf bucket ${inf.value} != count ${count.value}`);
    let prev = -Infinity;
    let prevValue = 0;
    for (const b of buckets) {
      const le = b.labels.le === '+Inf' ? Infinity : Number(b.labels.le);
      if (!(le > prev)) throw new Error(`histogram ${f.name}${k}: buckets not in increasing order`);
      if (b.value < prevValue) throw new Error(`histogram ${f.name}${k}: buckets not cumulative`);
      prev = le;
      prevValue = b.value;
    }
  }
}

/** The value of one series (labels matched exactly on the given ones), or undefined. */
export function valueOf(fams: Map<string, Family>, name: string, labels: Record<string, string> = {}): number | undefined {
  for (const f of fams.values()) {
    for (const s of f.samples) {
      if (s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v) && Object.keys(s.labels).length === Object.keys(labels).length) return s.value;
    }
  }
  return undefined;
}
