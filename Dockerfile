# Stevedore image: one image for `stevedore worker` and `stevedore server`.
# Build: docker build -t stevedore .   Run: see docker-compose.yaml.
# (No Docker engine runs on the machine this was written on: `docker-compose config` validates the
# compose file and a test checks it; this file is kept correct by reading, see README.)

# --- build: compile TypeScript with the dev dependencies, then drop them ---------------------
# Node 22 LTS: Node 20 is past its end of life, and the AWS SDK warns about it at every start.
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

# --- runtime: production dependencies and the compiled code, as the unprivileged `node` user ----
FROM node:22-bookworm-slim
ENV NODE_ENV=production \
    STEVEDORE_BACKENDS=default=file:///data/objects \
    STEVEDORE_STAGING_DIR=/data/staging \
    STEVEDORE_HTTP_HOST=0.0.0.0 \
    STEVEDORE_HTTP_PORT=8080
WORKDIR /app
COPY --from=build --chown=root:root /app/package.json ./
COPY --from=build --chown=root:root /app/node_modules ./node_modules
COPY --from=build --chown=root:root /app/dist ./dist
RUN mkdir -p /data/objects /data/staging && chown -R node:node /data
USER node
VOLUME ["/data"]
EXPOSE 8080
# For `stevedore server` (GET /health needs no token). The slim image has no curl: Node's fetch.
# A worker has no HTTP port: docker-compose.yaml turns this check off for the worker service.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.STEVEDORE_HTTP_PORT||8080)+'/health').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
# SIGTERM reaches node directly (exec form, PID 1): the worker drains, hands back what is left
# after STEVEDORE_SHUTDOWN_TIMEOUT_MS, and exits. The V8 flag is npm start's (package.json): a
# 4 MiB young generation keeps a streaming process's resident memory ~20 MB lower (README, HTTP speed).
ENTRYPOINT ["node", "--max-semi-space-size=4", "dist/src/bin/stevedore.js"]
CMD ["worker"]
