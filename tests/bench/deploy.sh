#!/usr/bin/env bash
# The baseline for `make bench`: the seed guide's deploy.sh (shared/seed/blue-green-guide.ko.md,
# section 1), written plainly the way the guide describes it, so bluegreen is measured against what
# it replaces. Not a product: no lock, no undo beyond the guide's failure table, no drain.
#
#   DEPLOY_ROOT=/opt/deploy NGINX="sudo nginx" deploy.sh PROJECT TAG
#
# Reads DEPLOY_ROOT/projects/PROJECT.env (IMAGE, BLUE_PORT, GREEN_PORT, APP_PORT, HEALTH_PATH,
# HEALTH_TIMEOUT, STOP_TIMEOUT, LOG_DIR, SPRING_PROFILES) and PROJECT.active, and rewrites the port
# in DEPLOY_ROOT/nginx/conf.d/PROJECT-upstream.conf. The only addition to the guide is one timing
# line per step on stderr, in bluegreen's format (`[3/6] health  ...: 2.07s`), for the bench.
set -e

PROJECT=$1
TAG=${2:-latest}
DEPLOY_ROOT=${DEPLOY_ROOT:-/opt/deploy}
NGINX_CMD=${NGINX:-nginx}
# nginx itself reads $NGINX (listening sockets handed over in a binary upgrade) and complains about
# ours, so it is not passed on.
unset NGINX

ENV_FILE="$DEPLOY_ROOT/projects/$PROJECT.env"
ACTIVE_FILE="$DEPLOY_ROOT/projects/$PROJECT.active"
UPSTREAM_FILE="$DEPLOY_ROOT/nginx/conf.d/$PROJECT-upstream.conf"

# shellcheck source=/dev/null
source "$ENV_FILE"
BLUE_PORT=${BLUE_PORT:-8081}
GREEN_PORT=${GREEN_PORT:-8082}
APP_PORT=${APP_PORT:-8080}
HEALTH_PATH=${HEALTH_PATH:-/api/health}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-120}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
LOG_DIR=${LOG_DIR-/app/logs}

# timing (bench only): microseconds since the epoch, then "S.ss" since the step started
now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }
step_start() { STEP_T0=$(now_us); }
step_done() { # N NAME DETAIL
    local d=$(( $(now_us) - STEP_T0 ))
    printf '[%s/6] %-7s %s: %d.%02ds\n' "$1" "$2" "$3" $((d / 1000000)) $((d % 1000000 / 10000)) >&2
}
step_failed() {
    local d=$(( $(now_us) - STEP_T0 ))
    printf '[%s/6] %-7s %s: FAILED after %d.%02ds\n' "$1" "$2" "$3" $((d / 1000000)) $((d % 1000000 / 10000)) >&2
}

CURRENT=$(cat "$ACTIVE_FILE" 2>/dev/null || true)
if [ "$CURRENT" = "blue" ]; then
    NEW=green; NEW_PORT=$GREEN_PORT; OLD=blue
else
    NEW=blue; NEW_PORT=$BLUE_PORT; OLD=green
fi
NEW_NAME="$PROJECT-$NEW"
OLD_NAME="$PROJECT-$OLD"
echo "deploy $PROJECT $TAG: $OLD -> $NEW (127.0.0.1:$NEW_PORT)"

# 1. pull the new image
step_start
docker pull -q "$IMAGE:$TAG" >/dev/null
step_done 1 pull "$IMAGE:$TAG"

# 2. start the idle colour
step_start
docker rm -f "$NEW_NAME" >/dev/null 2>&1 || true
# PUBLISH_HOST= (empty) publishes on all addresses, as the guide's hosts were found running (issue 11).
PUBLISH_HOST=${PUBLISH_HOST-127.0.0.1}
RUN_ARGS=(-d --name "$NEW_NAME" -p "${PUBLISH_HOST:+$PUBLISH_HOST:}$NEW_PORT:$APP_PORT")
if [ -n "$LOG_DIR" ]; then RUN_ARGS+=(-v "$LOG_DIR:$LOG_DIR"); fi
if [ -n "$SPRING_PROFILES" ]; then RUN_ARGS+=(-e "SPRING_PROFILES_ACTIVE=$SPRING_PROFILES"); fi
# Bench only: the demo app's boot time for this deploy (bench.py writes it into the env file).
if [ -n "${BOOT_DELAY:-}" ]; then RUN_ARGS+=(-e "BOOT_DELAY=$BOOT_DELAY"); fi
docker run "${RUN_ARGS[@]}" "$IMAGE:$TAG" >/dev/null
step_done 2 start "$NEW_NAME on 127.0.0.1:$NEW_PORT"

# 3. health check, once a second, up to HEALTH_TIMEOUT seconds
step_start
HEALTH_URL="http://127.0.0.1:$NEW_PORT$HEALTH_PATH"
healthy=
for i in $(seq 0 "$HEALTH_TIMEOUT"); do
    if curl -sf -o /dev/null --max-time 2 "$HEALTH_URL"; then healthy=1; break; fi
    if [ "$i" -lt "$HEALTH_TIMEOUT" ]; then sleep 1; fi
done
if [ -z "$healthy" ]; then
    step_failed 3 health "GET $HEALTH_URL"
    echo "health check failed: $HEALTH_URL; removing $NEW_NAME, $OLD_NAME keeps serving" >&2
    docker rm -f "$NEW_NAME" >/dev/null
    exit 1
fi
step_done 3 health "GET $HEALTH_URL"

# 4. point nginx at the new colour, test, reload
step_start
cp "$UPSTREAM_FILE" "$UPSTREAM_FILE.bak"
sed -i -E "s/(server 127\.0\.0\.1:)[0-9]+( down)?;/\1$NEW_PORT;/" "$UPSTREAM_FILE"
if ! { $NGINX_CMD -t 2>&1 && $NGINX_CMD -s reload; }; then
    step_failed 4 switch "nginx -> 127.0.0.1:$NEW_PORT"
    echo "nginx -t or reload failed; restoring the upstream, removing $NEW_NAME" >&2
    mv "$UPSTREAM_FILE.bak" "$UPSTREAM_FILE"
    docker rm -f "$NEW_NAME" >/dev/null
    exit 1
fi
rm -f "$UPSTREAM_FILE.bak"
step_done 4 switch "nginx -> 127.0.0.1:$NEW_PORT"

# 5. stop the old colour (graceful: docker stop gives it STOP_TIMEOUT seconds)
step_start
if [ -n "$(docker ps -q --filter "name=^/$OLD_NAME\$")" ]; then
    docker stop -t "$STOP_TIMEOUT" "$OLD_NAME" >/dev/null
    step_done 5 retire "stop $OLD_NAME (up to ${STOP_TIMEOUT}s)"
else
    step_done 5 retire "nothing to stop"
fi

# 6. record the active colour
step_start
echo "$NEW" > "$ACTIVE_FILE"
step_done 6 record "$PROJECT.active = $NEW"
echo "$PROJECT $TAG now serves from $NEW_NAME on 127.0.0.1:$NEW_PORT"
