"""`coldstart demo`: drives a running system through the gateway.

Registers two new users, shows their recommendations before and after a few
interactions, adds a new item and shows it recommended, then forgets a user.
"""

from __future__ import annotations

import argparse
import time
import uuid

import grpc
from coldstart.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from services.up import DEV_TOKEN, Ports


def show(title: str, reply: gateway_pb2.GatewayRecommendResponse) -> None:
    flags = " (degraded)" if reply.degraded else ""
    print(f"\n{title}  [model {reply.model_version}{flags}]")
    for rank, item in enumerate(reply.items, 1):
        print(f"  {rank:2d}. {item.item_id:<24} {item.score:7.3f}  {item.reason}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coldstart demo", description=__doc__)
    parser.add_argument("--gateway", default=f"127.0.0.1:{Ports().gateway}")
    parser.add_argument("--token", default=DEV_TOKEN)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args(argv)
    auth = (("authorization", f"Bearer {args.token}"),)
    with grpc.insecure_channel(args.gateway) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        try:
            info = gateway.GetModelInfo(
                gateway_pb2.GatewayGetModelInfoRequest(), metadata=auth, timeout=5
            )
        except grpc.RpcError as exc:
            print(
                f"coldstart demo: gateway at {args.gateway} not reachable ({exc.code().name}); run `make up` first"
            )
            return 1
        print(f"model {info.version}: {info.item_count} items, dimension {info.dimension}")

        def recommend(user_id: str) -> gateway_pb2.GatewayRecommendResponse:
            reply: gateway_pb2.GatewayRecommendResponse = gateway.Recommend(
                gateway_pb2.GatewayRecommendRequest(user_id=user_id, k=args.k),
                metadata=auth,
                timeout=5,
            )
            return reply

        fan = gateway.RegisterUser(
            gateway_pb2.RegisterUserRequest(
                attributes={"age_band": "25-34"},
                interest_text="space exploration, robots and science fiction",
            ),
            metadata=auth,
            timeout=10,
        )
        print(f"\nregistered {fan.user_id} (likes: space exploration, robots and science fiction)")
        time.sleep(1.0)  # fusion applies the event from Kafka
        before = recommend(fan.user_id)
        show(f"recommendations for {fan.user_id}, no interactions yet", before)

        liked = [item.item_id for item in before.items[:2]]
        gateway.RecordInteractions(
            gateway_pb2.RecordInteractionsRequest(
                interactions=[
                    gateway_pb2.InteractionRecord(user_id=fan.user_id, item_id=i, kind="like")
                    for i in liked
                ],
                idempotency_key=str(uuid.uuid4()),
            ),
            metadata=auth,
            timeout=10,
        )
        print(f"\n{fan.user_id} liked {', '.join(liked)}")
        time.sleep(1.0)
        show(f"recommendations for {fan.user_id} after two likes", recommend(fan.user_id))

        new_item = f"demo-item-{uuid.uuid4().hex[:6]}"
        gateway.UpsertItems(
            gateway_pb2.GatewayUpsertItemsRequest(
                items=[
                    gateway_pb2.ItemInput(
                        item_id=new_item,
                        text="Robots of the Outer Rim (2026) | Sci-Fi, Adventure: a crew of robots explores deep space",
                        tags=["new-arrival"],
                    )
                ]
            ),
            metadata=auth,
            timeout=10,
        )
        print(f"\nadded a brand-new item {new_item} (no interactions, tag new-arrival)")
        new_arrivals = gateway.Recommend(
            gateway_pb2.GatewayRecommendRequest(
                user_id=fan.user_id,
                k=args.k,
                filters=common_pb2.ItemFilters(tags_any=["new-arrival"]),
            ),
            metadata=auth,
            timeout=5,
        )
        show(f"new arrivals for {fan.user_id} (filter tags_any=new-arrival)", new_arrivals)
        placed = [i.item_id for i in new_arrivals.items]
        print(f"  -> the new item is {'recommended' if new_item in placed else 'NOT recommended'}")
        similar = gateway.SimilarItems(
            gateway_pb2.GatewaySimilarItemsRequest(item_id=new_item, k=3), metadata=auth, timeout=5
        )
        print(f"  items similar to {new_item}: {', '.join(i.item_id for i in similar.items)}")

        gateway.ForgetUser(
            gateway_pb2.ForgetUserRequest(user_id=fan.user_id), metadata=auth, timeout=10
        )
        time.sleep(1.0)
        forgotten = recommend(fan.user_id)
        print(f"\nforgot {fan.user_id}: now served as a new user: {forgotten.new_user}")
    return 0
