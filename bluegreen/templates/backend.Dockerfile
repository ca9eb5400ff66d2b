# Spring Boot image for bluegreen, written by `bluegreen init --ci github`.
# docker build -f infra/docker/backend.Dockerfile --build-arg JAR_FILE=apps/user-api/build/libs/user-api.jar -t IMAGE:TAG .
ARG JAVA_VERSION=21
FROM eclipse-temurin:${JAVA_VERSION}-jre

# uid 1000 is ec2-user on Amazon Linux 2023: what the app writes to the LOG_DIR volume (/app/logs)
# then belongs to the deploy user, who can read it and `bluegreen backup-logs` can move it.
ARG APP_UID=1000
WORKDIR /app
RUN mkdir -p /app/logs && chown "${APP_UID}:${APP_UID}" /app/logs

ARG JAR_FILE
COPY ${JAR_FILE} /app/app.jar

# Graceful shutdown: on `docker stop` (SIGTERM to java, PID 1 through the exec form) Spring finishes
# the requests in flight; keep STOP_TIMEOUT in the env file above spring's 30 s shutdown phase.
ENV SERVER_SHUTDOWN=graceful \
    JAVA_TOOL_OPTIONS="-XX:MaxRAMPercentage=75 -XX:+ExitOnOutOfMemoryError"
USER ${APP_UID}:${APP_UID}
EXPOSE 8080
ENTRYPOINT ["java", "-jar", "/app/app.jar"]
