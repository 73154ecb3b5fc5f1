"""What the gateway holds, study by study: queries of the instance index.

The rows are the index's ``instances`` (:mod:`gateway.store.index`) whose
file the gateway still holds: states ``received``, ``payload``, ``kept`` and
``aborted`` (an aborted association's instances stay until the reclaimer
removes them); ``replaced``, ``missing`` and ``removed`` rows name no file.
A row without a Study Instance UID (a file adopted after a crash, whose
header was never read) belongs to no study.  When an instance was received
again under the same AE title its file was replaced, and the index has a row
for each copy: only the last row of each file counts.

The statements are plain SQL that any of the index's back ends runs (no
functions of one engine; lists are gathered here, not by the database).
``node`` (which gateway of several received it) is read when the index has
that column, and is None otherwise.  Each function is one transaction:
it takes the connection first and runs on the database thread.
"""

from __future__ import annotations

from zope.interface import implementer

from gateway.interfaces import IStudyQuery

#: Instance states whose file the gateway holds.
HELD_STATES = ("received", "payload", "kept", "aborted")

_HELD_ROWS = f"state IN ({', '.join(repr(s) for s in HELD_STATES)}) AND study_uid IS NOT NULL"
# The last row of each file held; _STUDY: of one study (its UID is the argument).
_HELD = f"{_HELD_ROWS} AND id IN (SELECT MAX(id) FROM instances WHERE {_HELD_ROWS} GROUP BY path)"
_STUDY = (f"{_HELD_ROWS} AND study_uid = ? AND id IN (SELECT MAX(id) FROM instances WHERE {_HELD_ROWS} "
          "AND study_uid = ? GROUP BY path)")

#: The filters of :func:`studies`: name -> the condition on an instance row.
_FILTERS = {
    "PatientID": "patient_id = ?",
    "StudyInstanceUID": "study_uid = ?",
    "ae": "ae = ?",
    "received_since": "received >= ?",
    "received_before": "received < ?",
}


def _where(filters: dict) -> tuple[str, list]:
    clauses, args = [_HELD], []
    for name, value in filters.items():
        if value is not None:
            clauses.append(_FILTERS[name])
            args.append(value)
    return " AND ".join(clauses), args


def _distinct(conn, column, where, args, uids) -> dict[str, list]:
    """The distinct non-empty values of ``column`` per study of ``uids``, sorted."""
    marks = ", ".join("?" * len(uids))
    out: dict[str, set] = {u: set() for u in uids}
    for r in conn.execute(f"SELECT DISTINCT study_uid AS uid, {column} AS value FROM instances WHERE {where} "
                          f"AND study_uid IN ({marks})", [*args, *uids]):
        if r["value"]:
            out[r["uid"]].add(r["value"])
    return {u: sorted(v) for u, v in out.items()}


def studies(conn, filters: dict, limit: int, offset: int) -> dict:
    """One page of studies, the most recently received first.

    ``filters`` maps names of :data:`_FILTERS` to values (None: not
    filtered); the counts, bytes and times of each study are of the
    instances that match them.
    """
    where, args = _where(filters)
    total = conn.execute(f"SELECT COUNT(DISTINCT study_uid) AS n FROM instances WHERE {where}",
                         args).fetchone()["n"]
    rows = conn.execute(
        "SELECT study_uid AS uid, MIN(patient_id) AS patient_id, MIN(patient_name) AS patient_name, "
        "COUNT(DISTINCT series_uid) AS series, COUNT(*) AS instances, SUM(size) AS size, "
        f"MIN(received) AS first, MAX(received) AS last FROM instances WHERE {where} GROUP BY study_uid "
        "ORDER BY MAX(received) DESC, study_uid LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
    uids = [r["uid"] for r in rows]
    modalities = _distinct(conn, "modality", where, args, uids) if uids else {}
    aes = _distinct(conn, "ae", where, args, uids) if uids else {}
    items = []
    for r in rows:
        uid = r["uid"]
        items.append({"StudyInstanceUID": uid, "PatientID": r["patient_id"], "PatientName": r["patient_name"],
                      "modalities": modalities[uid], "series": r["series"], "instances": r["instances"],
                      "bytes": r["size"] or 0, "first_received": r["first"], "last_received": r["last"],
                      "ae_titles": aes[uid]})
    return {"total": total, "items": items}


def _association(row) -> dict:
    keys = row.keys()
    return {"id": row["id"], "calling_ae": row["calling_ae"], "called_ae": row["called_ae"],
            "peer": row["peer"], "started": row["started"], "ended": row["ended"], "state": row["state"],
            "node": row["node"] if "node" in keys else None}


def study(conn, uid: str) -> dict | None:
    """A study's series and instances, or None when nothing of it is held."""
    rows = conn.execute(f"SELECT * FROM instances WHERE {_STUDY} ORDER BY series_uid, received, id",
                        (uid, uid)).fetchall()
    if not rows:
        return None
    association_ids = sorted({r["association"] for r in rows if r["association"]})
    associations = {}
    if association_ids:
        marks = ", ".join("?" * len(association_ids))
        associations = {r["id"]: _association(r) for r in conn.execute(
            f"SELECT * FROM associations WHERE id IN ({marks})", association_ids)}
    series: dict[str, dict] = {}
    for r in rows:
        keys = r.keys()
        s = series.setdefault(r["series_uid"], {"SeriesInstanceUID": r["series_uid"], "Modality": r["modality"],
                                                "instances": []})
        s["instances"].append({
            "SOPInstanceUID": r["sop_instance_uid"], "SOPClassUID": r["sop_class_uid"],
            "TransferSyntaxUID": r["transfer_syntax"], "path": r["path"], "size": r["size"],
            "digest": r["digest"], "called_ae": r["called_ae"], "calling_ae": r["calling_ae"],
            "peer": r["peer"], "association": r["association"],
            "node": r["node"] if "node" in keys else None,
            "received": r["received"], "state": r["state"], "payload": r["payload"]})
    first = rows[0]
    return {"StudyInstanceUID": uid, "PatientID": first["patient_id"], "PatientName": first["patient_name"],
            "instances": len(rows), "bytes": sum(r["size"] or 0 for r in rows),
            "series": list(series.values()),
            "associations": [associations[a] for a in association_ids if a in associations]}


def study_files(conn, uid: str) -> list[str]:
    """The paths of the files held of a study, in the order received."""
    return [r["path"] for r in conn.execute(f"SELECT path FROM instances WHERE {_STUDY} AND path IS NOT NULL "
                                            "ORDER BY received, id", (uid, uid))]


@implementer(IStudyQuery)
class StudyIndex:
    """:class:`~gateway.interfaces.IStudyQuery` over the index database."""

    def __init__(self, db):
        self.db = db

    def studies(self, limit=100, offset=0, **filters):
        unknown = set(filters) - set(_FILTERS)
        if unknown:
            raise TypeError(f"unknown filter(s): {', '.join(sorted(unknown))}")
        return self.db.run(studies, filters, limit, offset)

    def study(self, uid):
        return self.db.run(study, uid)

    def files(self, uid):
        return self.db.run(study_files, uid)
