"""The three workers. Each folder holds one handler and its own helpers; a worker
imports only :mod:`formcraftd.core` and its own folder, never the AMQP layer and
never another worker."""
