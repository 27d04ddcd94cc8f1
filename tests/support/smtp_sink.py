"""A real SMTP server for the tests (aiosmtpd): every message it accepts
is written to DIR as one JSON file {peer, mail_from, rcpt_tos, data}, where
`peer` ("ip:port" of the client) tells the connection it came on. A
recipient whose address starts with `refuse-` is refused with a permanent
error whose text quotes the address, as real servers do.

Usage: python smtp_sink.py DIR
Listens on 127.0.0.1 on a free port and prints `PORT <n>` once listening.
Exits when its standard input closes (the test that started it is gone).
"""

import asyncio
import json
import os
import sys
import threading
import uuid

from aiosmtpd.smtp import SMTP


class Handler:
    def __init__(self, out):
        self.out = out

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("refuse-"):
            return "550 5.1.1 <%s>: Recipient address rejected" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        record = {
            "peer": "%s:%d" % tuple(session.peer[:2]),
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "data": envelope.content.decode("utf-8", "replace"),
        }
        name = uuid.uuid4().hex
        tmp = os.path.join(self.out, name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        # Readers only ever see whole files.
        os.rename(tmp, os.path.join(self.out, name + ".json"))
        return "250 OK"


def exit_when_stdin_closes():
    sys.stdin.read()
    os._exit(0)


async def main(out):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Handler(out), hostname="smtp.test"), "127.0.0.1", 0
    )
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    asyncio.run(main(sys.argv[1]))
