# Stevedore: one image for `stevedore worker` and `stevedore server` (and the CLI).
# Build: docker build -t stevedore .   Run: docker compose up (docker-compose.yaml).
# No Docker engine runs on the machine this was written on: `docker-compose config` and
# test/deploy/compose.test.ts check what can be checked without one (README, Docker).

# --- build: compile TypeScript with the dev dependencies, then drop them ---------------------
FROM node:22-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
# `npm install`, not `npm ci`: the lockfile is made on linux-x64 and may lack another platform's
# optional packages (esbuild, rollup), which `npm ci` refuses. --ignore-scripts: `prepare` needs
# the sources, which are not copied yet.
RUN npm install --no-audit --no-fund --ignore-scripts
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY jobs ./jobs
RUN npm run build && npm prune --omit=dev --no-audit --no-fund --ignore-scripts

# --- runtime: production dependencies and the compiled code, as a non-root user ---------------
FROM node:22-bookworm-slim
ENV NODE_ENV=production \
    STEVEDORE_BACKENDS=default=file:///data/objects \
    STEVEDORE_STAGING_DIR=/data/staging \
    STEVEDORE_HTTP_PORT=8080
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY deploy ./deploy
RUN mkdir -p /data/objects /data/staging && chown -R node:node /data
USER node
VOLUME ["/data"]
EXPOSE 8080
# The server's /health (Redis and every backend). A worker has no HTTP port: its service turns
# this off (docker-compose.yaml); BullMQ's stalled check is what notices a dead worker.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.STEVEDORE_HTTP_PORT || 8080) + '/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# SIGTERM reaches node directly (exec form, PID 1): a worker drains, hands back what is left after
# STEVEDORE_SHUTDOWN_TIMEOUT_MS, and exits; a server stops taking requests and closes.
ENTRYPOINT ["node", "dist/src/bin/stevedore.js"]
CMD ["worker"]
