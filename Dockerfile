# Stevedore worker image. Build: docker build -t stevedore .  Run: see docker-compose.yaml.
# (No Docker engine runs on the machine this was written on: kept correct by reading, see README.)

# --- build: compile TypeScript with the dev dependencies, then drop them ---------------------
FROM node:20-bookworm-slim AS build
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

# --- runtime: only what the worker needs -------------------------------------------------------
FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    STEVEDORE_BACKENDS=default=file:///data/objects \
    STEVEDORE_STAGING_DIR=/data/staging
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
RUN mkdir -p /data/objects /data/staging && chown -R node:node /data
USER node
VOLUME ["/data"]
# SIGTERM reaches node directly (exec form, PID 1): the worker drains, hands back what is left
# after STEVEDORE_SHUTDOWN_TIMEOUT_MS, and exits.
ENTRYPOINT ["node", "dist/src/bin/stevedore.js"]
CMD ["worker"]
