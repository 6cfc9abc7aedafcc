import { pino, type Logger } from 'pino';

export type { Logger };

/** Hides the password in a redis:// (or any) URL, for logs and messages. */
export function redactUrl(url: string): string {
  return url.replace(/\/\/([^:/@]*):([^@/]*)@/, (_m, user: string) => `//${user}:***@`);
}

/**
 * The one root logger; modules and jobs take children. Secrets are redacted by path, and Redis
 * URLs are passed through redactUrl before they are logged at all.
 */
export function createLogger(level: string, destination?: NodeJS.WritableStream): Logger {
  return pino(
    {
      level,
      base: { service: 'stevedore' },
      redact: {
        paths: ['password', '*.password', 'connectionString', '*.connectionString', 'secretAccessKey', '*.secretAccessKey', 'credentials', '*.credentials', 'headers.authorization'],
        censor: '***',
      },
    },
    destination ?? pino.destination({ fd: 2, sync: false }),
  );
}
