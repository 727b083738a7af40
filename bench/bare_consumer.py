"""The baseline: a minimal aio-pika consumer that only consumes, POSTs and acks.

No validation, signing, metrics or breakers: what formcraftd is compared with.

    python bench/bare_consumer.py AMQP_URL QUEUE CONCURRENCY
"""

from __future__ import annotations

import asyncio
import sys

import aio_pika
import aiohttp
import orjson
import uvloop


async def main(url: str, queue_name: str, concurrency: int) -> None:
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=concurrency * 2)
    queue = await channel.declare_queue(queue_name, passive=True)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2))
    limit = asyncio.Semaphore(concurrency)

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with limit:
            job = orjson.loads(message.body)
            payload = job["payload"]
            async with session.post(payload["url"], data=orjson.dumps(payload["body"])) as resp:
                await resp.read()
            await message.ack()

    await queue.consume(handle)
    await asyncio.Future()  # run until killed


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
