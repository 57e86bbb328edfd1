// Sortable tables (click or Enter on a header; again to reverse) and the filters of the compare page.
// A cell may carry its sort key in a [data-sort] element; empty cells ("–") always sort last.
(function () {
  "use strict";

  function key(cell) {
    const marked = cell.querySelector("[data-sort]");
    const raw = (marked ? marked.getAttribute("data-sort") : cell.textContent).trim();
    const empty = raw === "" || raw === "–" || raw === "-";
    const number = /^[+-]?\d+(\.\d+)?$/.test(raw) ? parseFloat(raw) : null;
    return { raw: raw.toLowerCase(), number: number, empty: empty };
  }

  function compare(a, b) {
    if (a.number !== null && b.number !== null) return a.number - b.number;
    if (a.number !== null) return -1;
    if (b.number !== null) return 1;
    return a.raw.localeCompare(b.raw);
  }

  function sortBy(table, heads, th, index) {
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const body = table.tBodies[0];
    const rows = Array.from(body.rows).map(function (row, i) {
      return { row: row, i: i, key: key(row.cells[index]) };
    });
    rows.sort(function (a, b) {
      if (a.key.empty !== b.key.empty) return a.key.empty ? 1 : -1;
      const c = compare(a.key, b.key);
      return (ascending ? c : -c) || a.i - b.i;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
  }

  function makeSortable(table) {
    if (table.dataset.vlmdSortable || !table.tHead || !table.tBodies.length) return;
    table.dataset.vlmdSortable = "1";
    const heads = Array.from(table.tHead.rows[0].cells);
    heads.forEach(function (th, index) {
      if (!th.textContent.trim()) return;
      th.setAttribute("role", "columnheader");
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(table, heads, th, index); });
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          sortBy(table, heads, th, index);
        }
      });
    });
  }

  function wireFilters(box) {
    const table = document.querySelector(".vlmd-compare table");
    if (!table || box.dataset.vlmdWired) return;
    box.dataset.vlmdWired = "1";
    const heads = Array.from(table.tHead.rows[0].cells).map(function (th) { return th.textContent.trim(); });
    const input = box.querySelector("[data-filter-text]");
    const selects = Array.from(box.querySelectorAll("select[data-filter-column]"));
    const count = box.querySelector(".vlmd-count");
    function apply() {
      const words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      let shown = 0;
      const rows = Array.from(table.tBodies[0].rows);
      rows.forEach(function (row) {
        const haystack = row.textContent.toLowerCase();
        let keep = words.every(function (w) { return haystack.indexOf(w) >= 0; });
        selects.forEach(function (select) {
          const column = heads.indexOf(select.getAttribute("data-filter-column"));
          if (keep && select.value && column >= 0) keep = row.cells[column].textContent.trim() === select.value;
        });
        row.hidden = !keep;
        if (keep) shown += 1;
      });
      if (count) count.textContent = shown + " of " + rows.length + " methods";
    }
    input.addEventListener("input", apply);
    selects.forEach(function (select) { select.addEventListener("change", apply); });
    apply();
  }

  function init() {
    document.querySelectorAll("article table").forEach(function (table) {
      if (!table.closest(".vlmd-card")) makeSortable(table);
    });
    document.querySelectorAll(".vlmd-filters").forEach(wireFilters);
  }

  if (typeof document$ !== "undefined") document$.subscribe(init);
  else if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
