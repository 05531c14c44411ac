"""Check 5 of CONTRACT.md §3 (and §3.1): may this team's turn go to OpenAI on this node?"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.errors import Code, GatewayError
from app.models import Team

if TYPE_CHECKING:
    from app.node import Node


def check_route(node: Node, team: Team | None, model: str) -> None:
    """Every failing reason, in the contract's order, in the message and `error.details`."""
    if (
        team is not None
        and team.allows(model)
        and node.credential(team.upstream_credential)
        and model in node.view.view.catalog
    ):
        return  # routable: no list of reasons to build
    reasons: list[str] = []
    if team is None or not team.allows(model):
        reasons.append("model_not_allowed")
    if team is None or not node.credential(team.upstream_credential):
        reasons.append("openai_provider_unavailable")
    if model not in node.view.view.catalog:
        reasons.append("pricing_unavailable")
    if reasons:
        raise GatewayError(
            Code.OPENAI_ROUTING_FAILED,
            f"Cannot route {model}: {', '.join(reasons)}.",
            param="model",
            details={"reasons": reasons},
        )
