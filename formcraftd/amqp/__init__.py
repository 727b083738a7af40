"""The AMQP side: the connection and its failover, the queue topology, the one
generic consumer, acks, republishing (retries, dead letters), dead-letter tools
and the delivery-events publisher. It knows no worker: handlers come in
through the interface in :mod:`formcraftd.core.handler`.
"""
