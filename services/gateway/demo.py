"""`coldstart demo`: drives a running system through its public API.

Registers a new user and shows their recommendations before and after a few
interactions, adds a new item and shows it recommended, then turns the whole
loop: a burst of interactions from new demo users goes through the gateway into
Kafka, the trainer logs it and retrains, its gate decides, fusion swaps to the
published version and a Recommend answers from it. Every step is printed with
the seconds since the burst, and the user is forgotten at the end.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from coldstart.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from services.up import DEV_TOKEN, Ports

Metadata = tuple[tuple[str, str], ...]
Print = Callable[[str], None]

# One new user per taste; the phrases read naturally for the embedded catalog's
# topics and for film catalogs alike.
DEMO_INTERESTS = (
    "space exploration, planets and rockets",
    "cooking pasta, bread and desserts",
    "jazz, guitar and live concerts",
    "football, tennis and big matches",
    "ancient empires, kings and castles",
    "stock markets, banks and investing",
    "forests, rivers and wildlife",
    "robots, software and computers",
)
FINAL_STATES = frozenset({"published", "gated", "failed"})


def show(title: str, reply: gateway_pb2.GatewayRecommendResponse, out: Print = print) -> None:
    flags = " (degraded)" if reply.degraded else ""
    out(f"\n{title}  [model {reply.model_version}{flags}]")
    for rank, item in enumerate(reply.items, 1):
        label = item.display.title or item.item_id
        out(f"  {rank:2d}. {label:<44.44} {item.score:7.3f}  {item.reason}")


@dataclass
class RetrainOutcome:
    """What the loop showed: the run's last state, its versions and the timeline."""

    run_id: str = ""
    state: str = ""
    message: str = ""
    previous_version: str = ""
    published_version: str = ""
    served_version: str = ""
    interactions: int = 0
    timeline: list[tuple[float, str]] = field(default_factory=list)


class Timeline:
    def __init__(self, out: Print) -> None:
        self.out = out
        self.started = time.monotonic()
        self.entries: list[tuple[float, str]] = []

    def mark(self, what: str) -> None:
        at = time.monotonic() - self.started
        self.entries.append((at, what))
        self.out(f"  [{at:6.1f}s] {what}")


class Demo:
    def __init__(
        self, gateway: gateway_pb2_grpc.GatewayServiceStub, token: str, k: int, out: Print
    ) -> None:
        self.gateway = gateway
        self.auth: Metadata = (("authorization", f"Bearer {token}"),)
        self.k = k
        self.out = out

    def recommend(
        self, user_id: str, k: int | None = None, filters: common_pb2.ItemFilters | None = None
    ) -> gateway_pb2.GatewayRecommendResponse:
        reply: gateway_pb2.GatewayRecommendResponse = self.gateway.Recommend(
            gateway_pb2.GatewayRecommendRequest(
                user_id=user_id, k=k or self.k, include_display=True, filters=filters
            ),
            metadata=self.auth,
            timeout=5,
        )
        return reply

    def register(self, interest: str, attributes: dict[str, str] | None = None) -> str:
        reply = self.gateway.RegisterUser(
            gateway_pb2.RegisterUserRequest(attributes=attributes or {}, interest_text=interest),
            metadata=self.auth,
            timeout=10,
        )
        return str(reply.user_id)

    def like(self, user_id: str, item_ids: list[str]) -> None:
        self.gateway.RecordInteractions(
            gateway_pb2.RecordInteractionsRequest(
                interactions=[
                    gateway_pb2.InteractionRecord(user_id=user_id, item_id=i, kind="like")
                    for i in item_ids
                ],
                idempotency_key=str(uuid.uuid4()),
            ),
            metadata=self.auth,
            timeout=10,
        )

    def model_version(self) -> str:
        info = self.gateway.GetModelInfo(
            gateway_pb2.GatewayGetModelInfoRequest(), metadata=self.auth, timeout=5
        )
        return str(info.version)

    # -- the first steps: one user, one new item ---------------------------------
    def new_user_and_item(self) -> str:
        interest = "space exploration, robots and science fiction"
        fan = self.register(interest, {"age_band": "25-34"})
        self.out(f"\nregistered {fan} (likes: {interest})")
        time.sleep(1.0)  # fusion applies the event from Kafka
        before = self.recommend(fan)
        show(f"recommendations for {fan}, no interactions yet", before, self.out)

        liked = before.items[:2]
        self.like(fan, [item.item_id for item in liked])
        titles = ", ".join(item.display.title or item.item_id for item in liked)
        self.out(f"\n{fan} liked {titles}")
        time.sleep(1.0)
        show(f"recommendations for {fan} after two likes", self.recommend(fan), self.out)

        new_item = f"demo-item-{uuid.uuid4().hex[:6]}"
        self.gateway.UpsertItems(
            gateway_pb2.GatewayUpsertItemsRequest(
                items=[
                    gateway_pb2.ItemInput(
                        item_id=new_item,
                        text="Robots of the Outer Rim (2026) | Sci-Fi, Adventure: "
                        "a crew of robots explores deep space",
                        tags=["new-arrival"],
                    )
                ]
            ),
            metadata=self.auth,
            timeout=10,
        )
        self.out(f"\nadded a brand-new item {new_item}: Robots of the Outer Rim (2026)")
        new_arrivals = self.recommend(fan, filters=common_pb2.ItemFilters(tags_any=["new-arrival"]))
        show(f"new arrivals for {fan} (filter tags_any=new-arrival)", new_arrivals, self.out)
        placed = [i.item_id for i in new_arrivals.items]
        self.out(
            f"  -> the new item is {'recommended' if new_item in placed else 'NOT recommended'}"
        )
        similar = self.gateway.SimilarItems(
            gateway_pb2.GatewaySimilarItemsRequest(item_id=new_item, k=3, include_display=True),
            metadata=self.auth,
            timeout=5,
        )
        self.out(
            "  items similar to it: "
            + "; ".join(i.display.title or i.item_id for i in similar.items)
        )
        return fan

    # -- the loop: events -> Kafka -> trainer -> gate -> registry -> fusion -------
    def retrain_loop(
        self,
        trainer: trainer_pb2_grpc.TrainerServiceStub,
        *,
        per_user: int = 36,
        wait_for_trigger_s: float = 20.0,
        timeout_s: float = 600.0,
    ) -> RetrainOutcome:
        status = trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5)
        outcome = RetrainOutcome(previous_version=status.current_model.version)
        before_run = status.last_run.run_id
        logged_before = status.events_applied

        users = [self.register(interest) for interest in DEMO_INTERESTS]
        time.sleep(1.0)  # fusion applies the registrations: their lists follow the interests
        self.out(
            f"\nthe loop: {len(users)} new users each like the {per_user} items recommended "
            f"to them (model {outcome.previous_version})"
        )
        timeline = Timeline(self.out)
        for user in users:
            items = [i.item_id for i in self.recommend(user, k=per_user).items]
            self.like(user, items)
            outcome.interactions += len(items)
        timeline.mark(
            f"{outcome.interactions} interactions acknowledged by Kafka (gateway RecordInteractions)"
        )

        deadline = time.monotonic() + timeout_s
        logged = False
        run_id = ""
        state = ""
        asked = False
        burst_logged_at = 0.0
        while time.monotonic() < deadline:
            status = trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=5)
            if not logged and status.events_applied >= logged_before + outcome.interactions:
                logged = True
                burst_logged_at = time.monotonic()
                timeline.mark(f"trainer logged them (events_applied {status.events_applied})")
            run = status.last_run
            if run.run_id and run.run_id not in (before_run, run_id):
                run_id = run.run_id
                timeline.mark(f"run {run_id} started ({run.reason})")
            if run_id and run.run_id == run_id and run.state != state:
                state = run.state
                if state in FINAL_STATES:
                    outcome.run_id, outcome.state, outcome.message = run_id, state, run.message
                    outcome.published_version = run.published_version
                    break
                timeline.mark(f"run {state}")
            if (
                logged
                and not run_id
                and not asked
                and time.monotonic() - burst_logged_at > wait_for_trigger_s
            ):
                # The trainer runs on its own triggers (retrain_every_events / _seconds);
                # one set off, or set higher than this burst, leaves the run to us.
                reply = trainer.TriggerRetrain(
                    trainer_pb2.TriggerRetrainRequest(reason="coldstart demo"), timeout=5
                )
                asked = True
                timeline.mark(f"no run started by itself: asked for one ({reply.run_id})")
            time.sleep(0.25)
        else:
            timeline.mark(f"no verdict within {timeout_s:g}s (run {run_id or 'never started'})")
            outcome.timeline = timeline.entries
            return outcome

        if outcome.state == "published":
            timeline.mark(f"gate passed, published {outcome.published_version}: {outcome.message}")
            while time.monotonic() < deadline and self.model_version() != outcome.published_version:
                time.sleep(0.1)
            timeline.mark(f"fusion swapped to {self.model_version()} (gateway GetModelInfo)")
            served = self.recommend(users[0])
            outcome.served_version = served.model_version
            timeline.mark(f"Recommend for {users[0]} answered by {served.model_version}")
            show(f"{users[0]} ({DEMO_INTERESTS[0]}) on the new version", served, self.out)
        elif outcome.state == "gated":
            timeline.mark(
                f"the gate kept {outcome.previous_version}: {outcome.message} "
                f"(the candidate was {run.candidate_version})"
            )
        else:
            timeline.mark(f"run failed: {outcome.message}")
        outcome.timeline = timeline.entries
        return outcome

    def forget(self, user_id: str) -> None:
        self.gateway.ForgetUser(
            gateway_pb2.ForgetUserRequest(user_id=user_id), metadata=self.auth, timeout=10
        )
        time.sleep(1.0)
        forgotten = self.recommend(user_id)
        self.out(f"\nforgot {user_id}: now served as a new user: {forgotten.new_user}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coldstart demo", description=__doc__)
    parser.add_argument("--gateway", default=f"127.0.0.1:{Ports().gateway}")
    parser.add_argument("--trainer", default=f"127.0.0.1:{Ports().trainer}")
    parser.add_argument("--token", default=DEV_TOKEN)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument(
        "--no-retrain", action="store_true", help="skip the retraining loop (no trainer needed)"
    )
    parser.add_argument(
        "--retrain-timeout", type=float, default=600.0, help="seconds to wait for the run"
    )
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k: must be >= 1, got {args.k}")
    with (
        grpc.insecure_channel(args.gateway) as gateway_channel,
        grpc.insecure_channel(args.trainer) as trainer_channel,
    ):
        demo = Demo(gateway_pb2_grpc.GatewayServiceStub(gateway_channel), args.token, args.k, print)
        try:
            info = demo.gateway.GetModelInfo(
                gateway_pb2.GatewayGetModelInfoRequest(), metadata=demo.auth, timeout=5
            )
        except grpc.RpcError as exc:
            print(
                f"coldstart demo: gateway at {args.gateway} not reachable ({exc.code().name}); "
                "run `make up` first"
            )
            return 1
        print(f"model {info.version}: {info.item_count} items, dimension {info.dimension}")
        fan = demo.new_user_and_item()
        code = 0
        if not args.no_retrain:
            trainer = trainer_pb2_grpc.TrainerServiceStub(trainer_channel)
            try:
                outcome = demo.retrain_loop(trainer, timeout_s=args.retrain_timeout)
            except grpc.RpcError as exc:
                print(
                    f"coldstart demo: trainer at {args.trainer} not reachable "
                    f"({exc.code().name}); --no-retrain skips the loop"
                )
                return 1
            code = 0 if outcome.state in ("published", "gated") else 1
        demo.forget(fan)
    return code
