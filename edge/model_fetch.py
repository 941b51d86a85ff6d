"""How an MQTT agent gets the model a round announces: the patch from the one it holds, else the file.

The agent subscribes to `pqsu/<fleet>/patch/<base>/+` when the announcement offers a patch from
the model it holds, to `pqsu/<fleet>/model/+` otherwise, and unsubscribes once it holds the
announced model, so it downloads only what it needs (docs/protocol.md, "Following the model").
`ModelFollower` (pqsu.protocol.model_follow) judges what arrives: a refused patch is counted by
reason, and the full model is fetched instead, its bytes counted with the refused patch's.

Chunk handlers run on paho's network thread and only reassemble and queue (`enqueue`); the
rest runs on the agent's thread, which hands over what verified to `serve(file) -> bool`.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from pqsu.protocol import chunking, model_id
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.messages import MessageError, check_patch_offers
from pqsu.protocol.model_follow import INCOMPLETE, ModelFollower
from pqsu.protocol.topics import Topics

log = logging.getLogger(__name__)


class ModelFetch:
    def __init__(self, topics: Topics, name: str, patch_timeout_s: float,
                 enqueue: Callable[..., None], serve: Callable[[model_id.VerifiedModel], bool]):
        self.topics, self.name, self.patch_timeout_s = topics, name, patch_timeout_s
        self.enqueue, self.serve = enqueue, serve
        self.client = None  # the agent's MqttClient, set once it exists
        self.follower = ModelFollower(name=name)
        # remember=1: late copies of the model just completed are dropped, but a model seen before may come
        # back (A, B, then A again: two jobs that start from the same seed)
        self.models = chunking.Reassembler(max_messages=4, max_bytes=1 << 30, remember=1)
        self.patches = chunking.Reassembler(max_messages=4, max_bytes=1 << 28, remember=4)
        self.want: tuple[str, tuple] | None = None  # (model id, patch offers) last announced
        self.fetching: tuple[str, str, float] | None = None  # ("patch", base, since) or ("full", "", since)
        self._wasted = 0  # bytes of a refused patch, counted with the full model that replaces it
        self.bad_messages = 0

    # -- network thread --------------------------------------------------------------
    def on_model_chunk(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:  # a cleared stale chunk
            return
        try:
            data = self.models.add(payload, source="model")
        except chunking.ChunkError as exc:
            self.bad_messages += 1
            log.info("bad model chunk on %s: %s", topic, exc)
            return
        if data is not None:
            self.enqueue(("model", data), _wire(data, payload))

    def on_patch_chunk(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        try:
            base = self.topics.parse(topic)[1][0]
            data = self.patches.add(payload, source=base)
        except (chunking.ChunkError, PqsuError) as exc:
            self.bad_messages += 1
            log.info("bad patch chunk on %s: %s", topic, exc)
            return
        if data is not None:
            self.enqueue(("patch", data), _wire(data, payload), base)

    # -- the agent's thread ----------------------------------------------------------
    def follow(self, target: str, offers: tuple) -> None:
        """Fetch model `target`: the announced patch from the held model, else the full file."""
        self.want = (target, tuple(offers))
        if self.follower.held_id == target:
            self.stop()
            return
        offer = self.follower.offer_for(target, offers)
        if offer is None:
            self.subscribe_full()
        elif self.fetching is None or self.fetching[:2] != ("patch", offer["base"]):
            self.stop()
            self.fetching = ("patch", offer["base"], time.perf_counter())
            self.client.subscribe(self.topics.patch_filter(offer["base"]), self.on_patch_chunk)

    def follow_done(self, payload: bytes) -> None:
        """The `done` message names the final model (and patches to it): follow it too."""
        body = json.loads(payload)
        if not isinstance(body.get("model_id"), str):
            return
        try:
            self.follow(body["model_id"], check_patch_offers(body.get("patches", []), "done message"))
        except MessageError as exc:
            self.bad_messages += 1
            log.info("bad done message: %s", exc)

    def subscribe_full(self) -> None:
        if self.fetching is not None and self.fetching[0] == "full":
            return
        self.stop()
        self.fetching = ("full", "", time.perf_counter())
        self.client.subscribe(self.topics.model_filter, self.on_model_chunk)

    def stop(self) -> None:
        if self.fetching is None:
            return
        kind, base, _ = self.fetching
        self.client.unsubscribe(self.topics.patch_filter(base) if kind == "patch" else self.topics.model_filter)
        self.fetching = None

    def check_timeout(self) -> None:
        """A patch whose frames have not all come within `patch_timeout_s` is refused: the full model."""
        if (self.fetching is not None and self.fetching[0] == "patch"
                and time.perf_counter() - self.fetching[2] > self.patch_timeout_s):
            self.follower.refuse(INCOMPLETE, f"its frames did not all arrive within {self.patch_timeout_s:g}s")
            self.subscribe_full()

    def take_patch(self, data: bytes, nbytes: int, base: str) -> bool:
        """True when the patch made the announced model, now held and served."""
        if self.want is None or self.fetching is None or self.fetching[:2] != ("patch", base):
            return False  # a late copy, or for a base no longer held
        target, offers = self.want
        offer = next((o for o in offers if o["base"] == base), None)
        previous = self.follower.held
        file = self.follower.take_patch(data, offer, target, nbytes) if offer else None
        if file is not None and not self.serve(file):
            self.follower.held, file = previous, None
        if file is None:
            self._wasted += nbytes
            self.subscribe_full()
            return False
        self.stop()
        return True

    def take_full(self, data: bytes, nbytes: int, serving) -> bool:
        """True when a new verified model is now held and served (`serving`: the agent's current one)."""
        try:
            file = model_id.verified(data)  # the one hash of this file on the board
        except PqsuError as exc:
            self.bad_messages += 1
            log.warning("received a model that does not verify: %s", exc)
            return False
        if self.want is not None and file.model_id != self.want[0] and serving is not None:
            return False  # an older retained version: the announced one follows
        if serving is not None and file.model_id == serving.model_id:
            self.stop()
            return False  # the retained chunks of the model we have (after a reconnect or restart)
        previous = self.follower.held
        self.follower.take_full(file, nbytes + self._wasted)
        if not self.serve(file):
            self.follower.held = previous
            return False
        self._wasted = 0
        if self.want is None or file.model_id == self.want[0]:
            self.stop()
        return True


def _wire(data: bytes, last_frame: bytes) -> int:
    """Bytes on the wire of a reassembled message: its data and one header per frame."""
    try:
        count = chunking.parse_header(last_frame).count
    except chunking.ChunkError:
        count = 1
    return len(data) + count * chunking.HEADER_SIZE
