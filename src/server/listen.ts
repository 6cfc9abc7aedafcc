import { isIP } from 'node:net';
import type { FastifyInstance } from 'fastify';

/** Loopback names and addresses: reachable from this machine only. */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '');
  if (h === 'localhost' || h === '::1') return true;
  return isIP(h) === 4 && h.startsWith('127.');
}

/**
 * Binds the server. Without a token it refuses any address but loopback (CONTRACT.md, HTTP): an
 * open port on a network with no auth would hand the queue and every backend to anyone.
 */
export async function listenServer(server: FastifyInstance, opts: { host: string; port: number; token: string | undefined }): Promise<string> {
  if (opts.token === undefined && !isLoopbackHost(opts.host)) {
    throw new Error(`refusing to listen on ${opts.host} without STEVEDORE_API_TOKEN: set a token, or listen on 127.0.0.1`);
  }
  return server.listen({ host: opts.host, port: opts.port });
}
