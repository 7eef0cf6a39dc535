// The admin page's only script: the "Copy" button beside a newly created key.
document.addEventListener("click", function (event) {
  var button = event.target.closest("button[data-copy]");
  if (!button) return;
  var text = document.getElementById(button.dataset.copy).textContent;
  var done = function () { button.textContent = "Copied"; };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, function () { select(button); });
  } else {
    select(button);
  }
  function select(b) {
    var range = document.createRange();
    range.selectNodeContents(document.getElementById(b.dataset.copy));
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    b.textContent = "Selected: press Ctrl+C";
  }
});
