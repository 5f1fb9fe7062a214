"""The flywheel's services. ``services.common`` is the runtime they share; one package each."""
