#!/bin/sh
# Run by the rabbitmq-init service (docker-compose.yml) on every start, as
# the rabbitmq user, with the broker's data volume for its Erlang cookie:
# the application user may configure, write and read in the vhost `tareas`
# only, and has no management tags. RABBITMQ_USER stays the operators'
# administrator. Idempotent.
set -eu
node=rabbit@rabbitmq
rabbitmqctl -q -n "$node" await_startup
rabbitmqctl -q -n "$node" add_vhost tareas 2>/dev/null || true
if ! rabbitmqctl -q -n "$node" add_user "$TAREAS_AMQP_USER" "$TAREAS_AMQP_PASSWORD" 2>/dev/null; then
  rabbitmqctl -q -n "$node" change_password "$TAREAS_AMQP_USER" "$TAREAS_AMQP_PASSWORD"
fi
rabbitmqctl -q -n "$node" set_user_tags "$TAREAS_AMQP_USER"
rabbitmqctl -q -n "$node" set_permissions -p tareas "$TAREAS_AMQP_USER" '.*' '.*' '.*'
echo "rabbitmq-init: user $TAREAS_AMQP_USER limited to vhost tareas"
