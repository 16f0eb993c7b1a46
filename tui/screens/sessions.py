"""Start screen: the saved sessions, and what can be done with one."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from engine.api import SessionRow
from engine.errors import AdapruneError
from tui.report import cut, when
from tui.screens.dialogs import Ask, Confirm
from tui.widgets import RowTable

COLUMNS = ("name", "model", "prune", "trials", "best", "status", "changed")
# widest cell of each cut column: with the others and the padding the row fits 80 columns (the rest in the hint)
NAME_W, MODEL_W, STATUS_W = 11, 11, 19


class SessionsScreen(Screen):
    BINDINGS = [
        Binding("enter", "open", "Open", id="sessions.open", tooltip="open the session: its trials"),
        Binding("n", "new", "New", id="sessions.new", tooltip="a new search session (a form)"),
        Binding("r", "resume", "Resume", id="sessions.resume", tooltip="resume its search (or follow another process's)"),
        Binding("a", "attach", "Attach", show=False, id="sessions.attach", tooltip="follow a search another process drives"),  # r attaches by itself when another process drives it
        Binding("e", "rename", "Rename", show=False, id="sessions.rename", tooltip="rename the session"),  # in the help and the palette; the footer is 80 wide
        Binding("d", "delete", "Delete", show=False, id="sessions.delete", tooltip="delete the session (asks first)"),
        Binding("l", "layers", "Layers", id="sessions.layers", tooltip="review and override the plan, layer by layer"),
        Binding("b", "bench", "Bench", id="sessions.bench", tooltip="benchmarks: dense against pruned"),
        Binding("f", "recover", "Recover", id="sessions.recover", tooltip="recover quality with LoRA"),
        Binding("x", "export", "Export", id="sessions.export", tooltip="export a pruned model folder"),
        Binding("f5", "refresh", "Refresh", show=False, id="sessions.refresh", tooltip="read the sessions again"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield RowTable(id="sessions", cursor_type="row", zebra_stripes=True)
        yield Static("", markup=False, id="hint", classes="dim")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        self.refresh_rows()
        # headless runs and workers change sessions underneath; reading every study is I/O: off the UI thread
        self.set_interval(3.0, lambda: self.run_worker(self._read_rows, thread=True, group="sessions",
                                                       exclusive=True, exit_on_error=False))

    def on_screen_resume(self) -> None:
        self.refresh_rows()

    generation = 0  # bumped by every change made here: a background read begun before it is stale

    def _read_rows(self) -> None:
        started = self.generation
        try:
            rows = self.app.backend.sessions()
        except AdapruneError:
            return  # the next explicit refresh (F5) shows the error

        def show() -> None:
            if started == self.generation:  # else a rename or delete happened meanwhile: these rows are old
                self.show_rows(rows)

        self.app.call_from_thread(show)

    def refresh_rows(self, select: str | None = None) -> None:
        """Read the sessions again; the cursor stays on the session it was on (or moves to `select`)."""
        self.generation += 1
        try:
            rows = self.app.backend.sessions()
        except AdapruneError as e:
            self.notify(str(e), severity="error")
            return
        self.show_rows(rows, select)

    def show_rows(self, rows: list[SessionRow], select: str | None = None) -> None:
        table = self.query_one(DataTable)
        selected = select or self.selected()
        # a process this app started that has not taken its session yet (it loads torch, seconds): "starting"
        starting = {job: set(self.app.searches(job)) for job in ("search", "recover")}
        table.clear()
        full: dict[str, str] = {}  # statuses too long for their column, said in full below the table
        for r in rows:
            best = f"{r.best:.2f}" if r.best is not None else ""
            status = r.status
            if r.name in starting["search"] and status not in ("running", "paused"):
                status = "starting"
            recovery = r.recovery
            if r.name in starting["recover"] and not (recovery or "").startswith(("running", "paused")):
                recovery = "starting"
            if recovery:  # "done, LoRA", "done, LoRA 40/100" (running), "done, LoRA stopped", "... paused"
                word = recovery.split()[0]
                status += ", LoRA" + ("" if recovery == "done" else f" {recovery.split()[-1]}" if word == "running"
                                      else f" {word}")
            if r.problem or len(status) > STATUS_W:
                full[r.name] = "; ".join([*([status] if len(status) > STATUS_W else []),
                                          *([r.problem] if r.problem else [])])
                status = cut(status, STATUS_W - 2) + " !"
            table.add_row(cut(r.name, NAME_W), cut(r.model, MODEL_W, path=True), f"{r.prune:.0%}" if
                          r.prune else "", f"{r.done}/{r.trials}", best, status, when(r.updated), key=r.name)
        if selected is not None and selected in {r.name for r in rows}:
            table.move_cursor(row=table.get_row_index(selected))
        hint = "no sessions yet: n starts one" if not rows else ""
        self.query_one("#hint", Static).update("\n".join([hint, *(f"{n}: {t}" for n, t in full.items())]).strip())

    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return key.value

    def _need(self) -> str | None:
        name = self.selected()
        if name is None:
            self.notify("no session selected: n starts one", severity="warning")
        return name

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_refresh(self) -> None:
        self.refresh_rows()

    def action_new(self) -> None:
        self.app.open_new_session()

    def action_open(self) -> None:
        if name := self._need():
            self.app.open_search(name, mode="view")

    def action_resume(self) -> None:
        if name := self._need():
            self.app.open_search(name, mode="drive")

    def action_attach(self) -> None:
        if name := self._need():
            self.app.open_search(name, mode="attach")

    def action_layers(self) -> None:
        if name := self._need():
            self.app.open_layers(name)

    def action_bench(self) -> None:
        if name := self._need():
            self.app.open_bench(name)

    def action_export(self) -> None:
        if name := self._need():
            self.app.open_export(name)

    def action_recover(self) -> None:
        if name := self._need():
            self.app.open_recover(name)

    def action_rename(self) -> None:
        name = self._need()
        if name is None:
            return

        def rename(new: str) -> str | None:
            """Done in the dialog, so a refusal (taken, bad name) shows there and the dialog stays open."""
            if new.strip() == name:
                return None
            try:
                self.app.backend.rename(name, new)
            except AdapruneError as e:
                return str(e)
            return None

        def done(new: str | None) -> None:
            renamed = bool(new) and new.strip() != name
            if renamed:
                self.notify(f"renamed {name} to {new.strip()}")
            self.refresh_rows(select=new.strip() if renamed else None)  # the cursor follows the session

        def live(new: str) -> str | None:
            return None if new.strip() == name else self.app.backend.name_problem(new.strip())

        self.app.push_screen(Ask(f"New name for {name}:", name, rename, live), done)

    def action_delete(self) -> None:
        name = self._need()
        if name is None:
            return

        def done(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.app.backend.delete(name)
                self.notify(f"deleted {name}")
            except AdapruneError as e:
                self.notify(str(e), severity="error")
            self.refresh_rows()

        self.app.push_screen(Confirm(f"Delete session {name} and everything in it (study, plans, results)?"), done)


