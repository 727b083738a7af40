"""The core: configuration, job messages, job fates, retry schedule, limits, breakers.

Nothing here knows AMQP, HTTP serving or any one worker; every other part of
formcraftd builds on it.
"""
