"""Tests of tareas.py against a running distribuidor with tokens and a
worker (scripts/test-python starts them): TAREAS_TEST_ADDR, TAREAS_TEST_URL,
TAREAS_TEST_TOKEN name them.

    python3 -m unittest discover -s cliente/python -v
"""

import hashlib
import os
import unittest
import uuid

import tareas

ADDR = os.environ.get("TAREAS_TEST_ADDR", "127.0.0.1:8888")
URL = os.environ.get("TAREAS_TEST_URL", "http://127.0.0.1:8080")
TOKEN = os.environ.get("TAREAS_TEST_TOKEN")
HOST, _, PORT = ADDR.rpartition(":")


def connect(token=TOKEN):
    return tareas.Client(HOST, int(PORT), token=token, timeout=60)


class SocketClientTest(unittest.TestCase):
    def test_a_task_is_acked_then_its_result_is_pushed(self):
        with connect() as client:
            ack = client.submit("hash", {"text": "hola"})
            self.assertEqual(ack["type"], "ack")
            result = next(client.results())
        self.assertEqual(result["task_id"], ack["task_id"])
        self.assertEqual(result["status"], "succeeded")
        self.assertEqual(result["result"]["sha256"], hashlib.sha256(b"hola").hexdigest())

    def test_pipelined_tasks_all_come_back(self):
        texts = ["texto-{}".format(i) for i in range(20)]
        with connect() as client:
            acks = client.submit_many([("echo", {"text": t}) for t in texts])
            self.assertTrue(all(a["type"] == "ack" for a in acks), acks)
            ids = {a["task_id"] for a in acks}
            echoed = {}
            for result in client.results():
                echoed[result["task_id"]] = result["result"]["text"]
                if len(echoed) == len(ids):
                    break
        self.assertEqual(set(echoed), ids)
        self.assertEqual(sorted(echoed.values()), sorted(texts))

    def test_an_error_reply_is_a_tareas_error_and_the_connection_stays(self):
        with connect() as client:
            with self.assertRaises(tareas.TareasError) as raised:
                client.submit("no-such-type", {})
            self.assertEqual(raised.exception.code, "unknown_task_type")
            self.assertEqual(client.ping(), {"type": "pong"})
            task_id = "py-" + str(uuid.uuid4())
            client.submit("echo", {"text": "uno"}, task_id=task_id)
            with self.assertRaises(tareas.TareasError) as conflict:
                client.submit("echo", {"text": "otro"}, task_id=task_id)
            self.assertEqual(conflict.exception.code, "conflict")
            self.assertIn(client.status(task_id)["state"], ("queued", "running", "succeeded"))

    @unittest.skipUnless(TOKEN, "the distribuidor has no tokens")
    def test_a_wrong_token_is_refused(self):
        with self.assertRaises(tareas.TareasError) as raised:
            connect(token="not-a-token")
        self.assertEqual(raised.exception.code, "unauthenticated")

    def test_the_demo_runs_every_built_in_type(self):
        argv = ["demo", "--addr", ADDR] + (["--token", TOKEN] if TOKEN else [])
        self.assertEqual(tareas.main(argv), 0)


class HttpClientTest(unittest.TestCase):
    def setUp(self):
        self.client = tareas.HttpClient(URL, token=TOKEN)

    def test_submit_then_wait_for_the_result(self):
        accepted = self.client.submit("sleep", {"ms": 300})
        self.assertEqual(accepted["status"], "queued")
        task = self.client.wait(accepted["task_id"], timeout=30)
        self.assertEqual(task["state"], "succeeded")
        self.assertEqual(task["result"], {"slept_ms": 300})

    def test_an_idempotency_key_names_the_task_and_conflicts_are_errors(self):
        key = "py-http-" + str(uuid.uuid4())
        self.assertEqual(self.client.submit("echo", {"text": "a"}, idempotency_key=key)["task_id"], key)
        with self.assertRaises(tareas.TareasError) as raised:
            self.client.submit("echo", {"text": "b"}, task_id=key)
        self.assertEqual((raised.exception.code, raised.exception.status), ("conflict", 409))

    def test_an_unknown_task_is_unknown(self):
        self.assertEqual(self.client.get("never-" + str(uuid.uuid4()))["state"], "unknown")

    def test_the_socket_and_the_http_api_see_the_same_tasks(self):
        with connect() as socket_client:
            ack = socket_client.submit("reverse", {"text": "abc"})
            next(socket_client.results())
        task = self.client.get(ack["task_id"])
        self.assertEqual((task["state"], task["result"]), ("succeeded", {"text": "cba"}))


if __name__ == "__main__":
    unittest.main()
