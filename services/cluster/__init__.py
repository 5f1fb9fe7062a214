"""The Kafka cluster as an operator sets it up, not as a service uses it: a single-node broker
for development (``local_broker``), the topics as code (``topics``) and each service's ACLs
and SCRAM user (``access``). The CLI, ``flywheel up``, replay, the benches and the tests use
them; no service does (a service's clients are in ``services.common``)."""
