import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StevedoreClient } from '../../src/queue/client.js';
import { redactJobData } from '../../src/server/dashboard.js';
import { startRedis, type TestRedis } from '../harness/redis.js';
import { TOKEN, testServer, type TestServer } from './harness.js';

/** Screenshots land here (ignored by git), for a look after the run. */
const ARTIFACTS = fileURLToPath(new URL('../artifacts/', import.meta.url));
/** Debian's chromium; `.ci/run` installs it when missing. */
const CHROMIUM = '/usr/bin/chromium';
const LOOPBACK = /^(https?|wss?):\/\/(127\.0\.0\.1|localhost|\[::1\])(:\d+)?\//;

describe('dashboard', () => {
  let redis: TestRedis;
  let t: TestServer;
  let base: string;
  let browser: Browser | undefined;
  // The real server (buildServer, its auth hook with a token) and an in-process worker.
  const w = {
    get queue(): string { return t.app.config.queue; },
    get client(): StevedoreClient { return t.app.client(); },
  };
  const basic = { authorization: `Basic ${Buffer.from(`admin:${TOKEN}`).toString('base64')}` };

  beforeAll(async () => {
    redis = await startRedis();
    t = await testServer(redis.url);
    base = await t.listen();
  });
  afterAll(async () => {
    await browser?.close();
    await t?.close();
    await redis?.stop();
  });

  it('redacts secret-named fields and inline content from job data', () => {
    expect(redactJobData({ key: 'k', source: { base64: 'A'.repeat(1000) }, metadata: { 'x-api-token': 't', owner: 'me' }, nested: [{ password: 'p' }] }))
      .toEqual({ key: 'k', source: { base64: '[1000 characters]' }, metadata: { 'x-api-token': '[redacted]', owner: 'me' }, nested: [{ password: '[redacted]' }] });
  });

  it('lists both queues and serves job data without secrets through its API', async () => {
    const id = await w.client.store({ key: 'secret/one', source: { path: 'nope.bin' }, metadata: { 'x-api-token': 'TOKEN-never-shown' } }, { attempts: 1 });
    await w.client.result(id).catch(() => {});
    const res = await t.server.inject({ url: `/admin/queues/api/queues?activeQueue=${w.queue}&status=failed&page=1`, headers: basic });
    expect(res.statusCode).toBe(200);
    const body = res.body;
    expect(body).not.toContain('TOKEN-never-shown');
    expect(body).toContain('[redacted]');
    const names = (res.json() as { queues: Array<{ name: string }> }).queues.map((q) => q.name);
    expect(names).toEqual(expect.arrayContaining([w.queue, `${w.queue}-webhooks`]));
  });

  it('promotes delayed jobs and cleans completed ones through the board', async () => {
    const delayed = await w.client.log({ site: 's', build: 'later', action: 'a', status: 'ok' }, { delay: 3_600_000 });
    expect(await (await w.client.getJob(delayed))!.getState()).toBe('delayed');
    const promote = await t.server.inject({ method: 'PUT', url: `/admin/queues/api/queues/${w.queue}/promote`, headers: basic });
    expect(promote.statusCode).toBe(200);
    await w.client.result(delayed);
    // Bull Board cleans jobs finished more than 5 s ago: asked again until this one is that old.
    await expect.poll(async () => {
      const clean = await t.server.inject({ method: 'PUT', url: `/admin/queues/api/queues/${w.queue}/clean/completed`, headers: basic });
      expect(clean.statusCode).toBe(200);
      return (await w.client.queue.getJobCounts('completed')).completed;
    }, { timeout: 15_000, interval: 1_000 }).toBe(0);
  });

  it('in a real browser: shows the board, retries a failed job from the UI, and the job completes', async () => {
    const id = await w.client.store({ key: 'ui/retry', source: { path: 'later.bin' } }, { attempts: 1 });
    await expect(w.client.result(id)).rejects.toThrow(/^NotFound/);
    // What was missing is there now: a retry can succeed.
    await writeFile(join(t.stagingDir, 'later.bin'), 'arrived');

    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'] });
    // Without credentials the browser gets the 401 and its Basic challenge, not the board.
    // (Headless Chromium, with nobody to ask for a password, ends such a navigation with an error.)
    const anonymous = await browser.newPage();
    await expect(anonymous.goto(`${base}/admin/queues`)).rejects.toThrow(/ERR_INVALID_AUTH_CREDENTIALS/);
    const refused = await anonymous.request.get(`${base}/admin/queues`);
    expect(refused.status()).toBe(401);
    expect(refused.headers()['www-authenticate']).toMatch(/^Basic /);
    await anonymous.close();
    // With them (any user, the token as password), as an operator's browser sends them.
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, httpCredentials: { username: 'admin', password: TOKEN } });
    const page = await context.newPage();
    // Nothing leaves the machine (the board asks for web fonts elsewhere): refused, and it still works.
    await page.route('**/*', (route) => {
      const url = route.request().url();
      return LOOPBACK.test(url) || url.startsWith('data:') ? route.continue() : route.abort();
    });
    await page.goto(`${base}/admin/queues`);
    await expect.poll(() => page.title()).toMatch(/Stevedore/);
    await page.getByText(w.queue, { exact: true }).first().waitFor();
    await page.getByText(`${w.queue}-webhooks`).first().waitFor();
    await page.goto(`${base}/admin/queues/queue/${encodeURIComponent(w.queue)}?status=failed`);
    // The failed job's card, found by its link, and the retry button among its actions.
    const card = page.locator('[class*="card-"]').filter({ has: page.locator(`a[href*="/${id}?status=failed"]`) }).first();
    await card.waitFor();
    await card.getByText('Error', { exact: true }).click();
    await card.getByText(/NotFound: /).first().waitFor();
    await mkdir(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, 'dashboard-failed.png'), fullPage: true });
    await card.locator('button:has(svg.lucide-refresh-cw)').first().click();
    // Bull Board may ask to confirm.
    const confirm = page.getByRole('button', { name: /^(retry|confirm|yes)$/i });
    if (await confirm.first().isVisible().catch(() => false)) await confirm.first().click();
    const job = await w.client.getJob(id);
    await expect.poll(async () => job!.getState(), { timeout: 20_000 }).toBe('completed');
    expect((await w.client.getJob(id))!.returnvalue).toMatchObject({ key: 'ui/retry', size: 7 });
    await page.goto(`${base}/admin/queues/queue/${encodeURIComponent(w.queue)}?status=completed`);
    await page.locator(`a[href*="/${id}?status=completed"]`).first().waitFor();
    await page.screenshot({ path: join(ARTIFACTS, 'dashboard-completed.png'), fullPage: true });
  }, 60_000);
});
