#!/bin/sh
# The distribution's tool of this name (docker-compose.yml's health probe of the broker).
exec java -cp '/opt/kafka/libs/*' -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties \
  org.apache.kafka.tools.BrokerApiVersionsCommand "$@"
