"""The shared delivery ledger of the scale-out mode: which node sends which result, and what
each destination has.

In the scale-out mode an image stays in the shared queue until every result built from it is
settled (delivered or dead-lettered): should its node die before, another node takes the image,
builds the same results (the same UIDs and content) and sends what the destination does not
have yet. ``dp_deliveries`` makes that "exactly once" whichever node built a result: before an
object goes on the wire, its sender claims it (destination, SOP Instance UID) for a short
time; after the destination's answer, the claim becomes "delivered" with the content digest
sent, or is given up.

:meth:`DeliveryLedger.claim` says, per object:

* ``send``: no one has sent it (or the destination has an older content of that UID): send it.
* ``delivered``: the destination has this very content (from this node or another): do not
  send it, count it settled.
* ``busy``: another node is sending it now: leave it for a later round.
* ``doubt``: a sender (this one before it died, or another whose claim lapsed) put it on the
  wire and no answer was recorded: ask the destination before sending it again (C-FIND or
  QIDO-RS, as the single node does after a crash).

A claim lasts ``claim_s`` from when it is made, enough for one object's send and answer (the
sender claims each group just before it goes on the wire); a sender that dies holds its
claims no longer than that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pacs_node.scale.db import Database

SCHEMA = """
CREATE TABLE dp_deliveries (
    destination text NOT NULL,
    uid text NOT NULL,
    digest text NOT NULL,
    state text NOT NULL CHECK (state IN ('sending', 'delivered')),
    owner text,
    until timestamptz,
    node text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, uid)
);
"""

Verdict = Literal["send", "delivered", "busy", "doubt"]


@dataclass(frozen=True)
class Claim:
    """One object a sender wants to send: its destination, UID and content digest."""

    destination: str
    uid: str
    digest: str


class DeliveryLedger:
    """``dp_deliveries`` over its own connection; one per destination sender.

    Args:
        dsn: a libpq connection string.
        owner: this sender's name on its claims (the node's name and a suffix unique per process).
        claim_s: how long a claim holds without an answer.
    """

    def __init__(self, dsn: str, owner: str, claim_s: float) -> None:
        self.owner, self.claim_s = owner, float(claim_s)
        self.db = Database(dsn, (("dp_deliveries", SCHEMA),))

    def close(self) -> None:
        self.db.close()

    def has(self, claim: Claim) -> bool:
        """Whether the destination has this content of the UID (delivered by any node)."""
        rows = self.db.execute(
            "SELECT 1 FROM dp_deliveries WHERE destination = %s AND uid = %s AND digest = %s"
            " AND state = 'delivered'",
            (claim.destination, claim.uid, claim.digest),
        )
        return bool(rows)

    def claim(self, claims: list[Claim]) -> dict[Claim, Verdict]:
        """Claim each object for this sender, in one transaction; what to do with each (see the module).

        Raises:
            pacs_node.scale.db.Unavailable: the database is unreachable: send nothing.
        """

        def decide(db: Any) -> dict[Claim, Verdict]:
            verdicts: dict[Claim, Verdict] = {}
            with db.transaction():
                # one order for every sender: two transactions never wait on each other's rows
                for claim in sorted(claims, key=lambda c: (c.destination, c.uid)):
                    verdicts[claim] = self._decide(db, claim)
            return verdicts

        return self.db.run(decide)

    def _decide(self, db: Any, claim: Claim) -> Verdict:
        values = {
            "d": claim.destination,
            "u": claim.uid,
            "g": claim.digest,
            "o": self.owner,
            "s": self.claim_s,
        }
        # A new row is this sender's claim at once; a row already there (or inserted by a
        # concurrent transaction, which this statement waits for) is locked and decided on:
        # no two senders can both find "no row" and both send.
        inserted = db.execute(
            """
            INSERT INTO dp_deliveries (destination, uid, digest, state, owner, until, node)
            VALUES (%(d)s, %(u)s, %(g)s, 'sending', %(o)s,
                    now() + make_interval(secs => %(s)s), %(o)s)
            ON CONFLICT (destination, uid) DO NOTHING
            RETURNING 1
            """,
            values,
        ).fetchone()
        if inserted is not None:
            return "send"
        row = db.execute(
            "SELECT digest, state, owner, until >= now() FROM dp_deliveries"
            " WHERE destination = %s AND uid = %s FOR UPDATE",
            (claim.destination, claim.uid),
        ).fetchone()
        if row is None:  # given up between the two statements: free again
            return self._decide(db, claim)
        digest, state, owner, live = row
        if state == "delivered" and digest == claim.digest:
            return "delivered"
        if state == "sending" and owner != self.owner and live:
            return "busy"
        db.execute(
            """
            UPDATE dp_deliveries SET digest = %(g)s, state = 'sending', owner = %(o)s,
                until = now() + make_interval(secs => %(s)s), node = %(o)s, at = now()
            WHERE destination = %(d)s AND uid = %(u)s
            """,
            values,
        )
        # a send that was never answered (this sender's, or a dead one's): ask first
        return "doubt" if state == "sending" else "send"

    def delivered(self, claim: Claim) -> None:
        """The destination has this content of the UID (whoever holds the claim now)."""
        self.db.execute(
            """
            INSERT INTO dp_deliveries (destination, uid, digest, state, node)
            VALUES (%s, %s, %s, 'delivered', %s)
            ON CONFLICT (destination, uid) DO UPDATE SET
                digest = EXCLUDED.digest, state = 'delivered', owner = NULL, until = NULL,
                node = EXCLUDED.node, at = now()
            """,
            (claim.destination, claim.uid, claim.digest, self.owner),
        )

    def give_up(self, claims: list[Claim]) -> None:
        """This sender's claims of ``claims`` end without a delivery (answered, not stored; or
        never sent): another may send them at once."""
        if not claims:
            return
        self.db.execute(
            """
            DELETE FROM dp_deliveries AS d
            USING unnest(%s::text[], %s::text[]) AS t(destination, uid)
            WHERE d.destination = t.destination AND d.uid = t.uid
                AND d.state = 'sending' AND d.owner = %s
            """,
            ([c.destination for c in claims], [c.uid for c in claims], self.owner),
        )
