"""Registry maintenance: verify every blob and manifest, and collect garbage safely."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .catalog import Registry
from .errors import BlobNotFound, BlobUnreadable, ManifestError, MaskbankError, RegistryError, RegistryUnreachable
from .manifest import BlobRef
from .progress import Progress, no_progress


@dataclass
class Problem:
    """One thing wrong with the registry, named so a person can act on it."""

    kind: str  # 'manifest', 'missing', 'corrupt', 'unreadable'
    where: str
    message: str


@dataclass
class VerifyReport:
    generations: dict[str, int] = field(default_factory=dict)  # model -> generations checked
    blobs_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # blobs no manifest references (gc removes them)
    strays: list[str] = field(default_factory=list)  # keys under blobs/ that name no blob (left alone)
    leftovers: list[str] = field(default_factory=list)  # temporary files of killed writes (gc removes them)
    manifests_complete: bool = True  # every manifest read: only then is an unreferenced blob surely an orphan

    @property
    def ok(self) -> bool:
        return not self.problems


def referenced_blobs(registry: Registry, report: VerifyReport | None = None) -> dict[str, BlobRef]:
    """Every blob referenced by any generation of any model. Unreadable manifests go to `report`
    if given, else raise (a caller about to delete blobs must not guess)."""
    refs: dict[str, BlobRef] = {}
    for model in registry.list_models():
        try:
            generations = registry.generations(model)
        except ManifestError as error:  # the system will not list its folder: its references are unknown
            if report is None:
                raise
            report.problems.append(Problem("unreadable", f"{model} generations", str(error)))
            continue
        if missing := sorted(set(range(1, generations[-1] + 1)) - set(generations)) if generations else []:
            error = RegistryError(f"generation(s) {', '.join(map(str, missing))} of '{model}' are missing: publishing adds "
                                  "generations one at a time, so they were deleted or not copied; restore them")
            if report is None:
                raise error
            report.problems.append(Problem("missing", f"{model} generations", str(error)))
        for generation in generations:
            try:
                manifest = registry.manifest(model, generation)
            except RegistryUnreachable:  # the registry, not this manifest
                raise
            except (MaskbankError, OSError) as error:
                if report is None and isinstance(error, MaskbankError):
                    raise
                if report is None:  # a system error, said as the registry's, naming the manifest
                    where = registry.storage.describe(registry.manifest_key(model, generation))
                    raise RegistryError(f"manifest {where} {_reason(error)}") from None
                report.problems.append(Problem("manifest", f"{model} generation {generation}", _reason(error)))
                continue
            refs.update((ref.digest, ref) for ref in manifest.blob_refs())
        if report is not None and generations:  # an entry without any is no model (registry ls says so)
            report.generations[model] = len(generations)
    return refs


def verify(registry: Registry, progress: Progress = no_progress) -> VerifyReport:
    """Re-hash and decode every referenced blob, read every manifest, and list orphans.
    `progress(items, total)` may wrap the loop over the blobs (a progress bar)."""
    report = VerifyReport()
    refs = referenced_blobs(registry, report)
    report.manifests_complete = not report.problems
    for digest, ref in progress(sorted(refs.items()), len(refs)):
        report.blobs_checked += 1
        try:
            registry.load(ref)
        except RegistryUnreachable:  # the registry, not this blob: every next read would wait as long
            raise
        except (MaskbankError, OSError) as error:  # an unreadable blob is one problem, not the end of the check
            kind = ("unreadable" if isinstance(error, (OSError, BlobUnreadable)) else
                    "missing" if isinstance(error, BlobNotFound) else "corrupt")
            report.problems.append(Problem(kind, registry.blobs.describe(digest),
                                           f"{_reason(error)} (used by {_users(registry, digest)})"))
    stored = registry.blobs.inventory()
    report.problems += [Problem("unreadable", registry.storage.describe(folder), f"cannot be listed ({why}): its "
                                "blobs are not checked for orphans") for folder, why in stored.unlisted.items()]
    unreferenced = sorted(set(stored.digests) - set(refs))
    folders = {digest for digest in unreferenced if _is_folder(registry, registry.blobs.key(digest))}
    leftovers = stored.leftovers + _manifest_leftovers(registry)
    in_the_way = [key for key in leftovers if _is_folder(registry, key)]
    report.orphans = [digest for digest in unreferenced if digest not in folders]  # gc leaves folders alone
    report.leftovers = [key for key in leftovers if key not in in_the_way]
    report.strays = stored.strays + [registry.blobs.key(digest) for digest in sorted(folders)] + in_the_way
    if report.orphans and report.manifests_complete and not report.generations:  # a health check must not pass it
        report.problems.append(Problem("missing", registry.storage.describe("models"),
                                       f"no manifest, yet {len(report.orphans)} blob(s): a models/ folder not mounted "
                                       "or not copied looks so (as does a first publish under way, or killed); "
                                       "`maskbank registry gc` refuses to delete them all unless given "
                                       "--delete-all-blobs (for a registry whose models are gone)"))
    return report


def _sweep(registry: Registry, key: str, grace_seconds: float, dry_run: bool, report: GcReport) -> bool | None:
    """Delete `key` if it is older than the grace period (True; its bytes counted), keep it if younger
    (False), or leave it alone if it is no file to delete (None; said in the report): a folder in its
    place, a file the system will not let gc look at or remove. The dry run looks as the real one."""
    try:
        size = registry.storage.size(key)  # first: the age is the last thing looked at before the delete
        if time.time() - registry.storage.modified(key) < grace_seconds:
            return False
        if not dry_run:
            registry.storage.delete(key)
    except OSError as error:
        why = "a folder, not a file" if isinstance(error, IsADirectoryError) else (error.strerror or type(error).__name__)
        report.left_alone.append(f"{registry.storage.describe(key)}: {why}")
        return None
    report.bytes_freed += size
    return True


def _is_folder(registry: Registry, key: str) -> bool:
    """Whether `key` is a folder (a blob's name, but nothing gc can delete), not a file."""
    try:
        registry.storage.size(key)
    except IsADirectoryError:
        return True
    except OSError:  # gone since the listing, or unreadable: gc says which
        pass
    return False


def _reason(error: Exception) -> str:
    """An error in words: an OSError says what the system said about which file."""
    return f"cannot be read: {str(error) or type(error).__name__}" if isinstance(error, OSError) else str(error)


def _manifest_leftovers(registry: Registry) -> list[str]:
    """Temporary files that killed writes left beside manifests (local directories only); those beside
    blobs come with BlobStore.inventory."""
    return [key for model in registry.list_models() for key in registry.storage.leftovers(registry.generations_prefix(model))]


def _users(registry: Registry, digest: str) -> str:
    """What references blob `digest` in each model's newest readable generation, in words (which
    task to republish, which backbone to restore), or that only older generations do."""
    users = []
    for model in registry.list_models():
        try:
            manifest = registry.manifest(model)
        except (MaskbankError, OSError):  # reported on its own
            continue
        users += [f"model '{model}' {what}" for ref, what in manifest.blob_uses() if ref.digest == digest]
    return "; ".join(users) or "older generations only"


@dataclass
class GcReport:
    deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept_recent: list[str] = field(default_factory=list)  # unreferenced but younger than the grace period
    leftovers_deleted: list[str] = field(default_factory=list)  # temporary files of killed writes
    left_alone: list[str] = field(default_factory=list)  # what could not be inspected or deleted, and why


def collect_garbage(registry: Registry, grace_seconds: float = 3600.0, dry_run: bool = False,
                    progress: Progress = no_progress, delete_all: bool = False) -> GcReport:
    """Delete blobs that no generation of any model references and that are older than the grace period.

    Safe against a concurrent publish: a publisher writes (or rewrites) its blobs before its
    manifest, so the blobs of a publish in progress are younger than the grace period; each
    candidate's age is checked again right before it is deleted. Refuses to run while any
    manifest is unreadable, because its references would be unknown, and while no manifest references
    any blob and there are blobs (a models/ folder not mounted or not copied looks so), unless
    `delete_all`.
    """
    if not grace_seconds >= 0:
        raise RegistryError(f"gc refused: the grace period must be 0 seconds or more, got {grace_seconds:g} (it spares "
                            "the blobs of a publish in progress; 0 deletes every unreferenced blob now)")
    try:
        referenced = set(referenced_blobs(registry))
    except RegistryUnreachable:
        raise
    except MaskbankError as error:
        raise RegistryError(f"gc refused: {error}; every generation must be read first (`maskbank registry verify` "
                            "lists what is wrong)") from None
    report = GcReport()
    stored = registry.blobs.inventory()
    if stored.unlisted:
        folder, why = next(iter(stored.unlisted.items()))
        raise RegistryError(f"gc refused: {registry.storage.describe(folder)} cannot be listed ({why}); fix its "
                            "permissions first (`maskbank registry verify` lists every such folder)")
    candidates = sorted(set(stored.digests) - referenced)
    if not referenced and candidates and not delete_all:
        raise RegistryError(f"gc refused: no manifest in {registry.location} references any blob, yet it holds "
                            f"{len(candidates)} blob(s): with its models/ folder not mounted or not copied, gc would "
                            "delete them all. If the registry has no models any more, pass --delete-all-blobs")
    for digest in progress(candidates, len(candidates)):
        swept = _sweep(registry, registry.blobs.key(digest), grace_seconds, dry_run, report)
        if swept is not None:
            (report.deleted if swept else report.kept_recent).append(digest)
    for key in stored.leftovers + _manifest_leftovers(registry):  # a live writer's temporary is seconds old: spared
        if _sweep(registry, key, grace_seconds, dry_run, report):
            report.leftovers_deleted.append(key)
    return report
