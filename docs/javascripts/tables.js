// Sortable tables (the catalogue's overview): tablesort 5.6.0 (MIT, vendored beside this file), on every
// page Material loads, as Material's documentation recommends.
document$.subscribe(function () {
  document.querySelectorAll("article table:not([class])").forEach(function (table) {
    new Tablesort(table);
  });
});
