#!/bin/sh
# As the apache/kafka image starts: every KAFKA_<NAME> variable is the property <name> in
# lower case, with _ as . (__ as _, ___ as -); CLUSTER_ID formats the storage on first start.
set -euf  # -f: the class path's * is java's, not a glob
props=/opt/kafka/config/server.properties
: > "$props"
env | grep '^KAFKA_' \
  | grep -v -E '^KAFKA_(HEAP_OPTS|OPTS|JVM_PERFORMANCE_OPTS|GC_LOG_OPTS|LOG4J_OPTS|JMX_OPTS)=' \
  | while IFS='=' read -r name value; do
      key=$(printf '%s' "${name#KAFKA_}" | tr 'A-Z' 'a-z' \
            | sed -e 's/___/-/g' -e 's/__/@/g' -e 's/_/./g' -e 's/@/_/g')
      printf '%s=%s\n' "$key" "$value" >> "$props"
    done
java="java -cp /opt/kafka/libs/* -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties"
$java kafka.tools.StorageTool format --ignore-formatted -t "$CLUSTER_ID" -c "$props"
exec $java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g} -XX:+UseG1GC -Djava.awt.headless=true \
  kafka.Kafka "$props"
