// sdtrain: browser-side helpers. Everything lives on window.sdtrain so nothing collides with the
// webui's globals (the host's textualInversion.js defines start_training_textual_inversion).
window.sdtrain = window.sdtrain || {};

(function(sdtrain) {
    "use strict";
    // The host's own training sub-tabs (modules/ui.py, Train tab), hidden while sdtrain serves their routes.
    var HOST_TABS = ["Create embedding", "Create hypernetwork", "Train", "Preprocess images"];
    var SUFFIX = "(sdtrain)";

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function trainTabButtons() {
        return Array.prototype.slice.call(app().querySelectorAll("#train_tabs > .tab-nav > button, #train_tabs > div > .tab-nav > button"));
    }

    function isOurs(button) {
        return button.textContent.trim().endsWith(SUFFIX);
    }

    // Hide the webui's own sub-tabs (setting on by default); the first of ours is then selected.
    sdtrain.hideHostTabs = function() {
        var o = window.opts || {};
        if (o.sdtrain_hide_host_training_tabs === false || o.sdtrain_serve_host_training_routes === false) {
            return false;
        }
        var buttons = trainTabButtons();
        var hid = false;
        buttons.forEach(function(b) {
            if (!isOurs(b) && HOST_TABS.indexOf(b.textContent.trim()) >= 0) {
                b.style.display = "none";
                b.classList.add("sdtrain-hidden-host-tab");
                hid = true;
            }
        });
        var selected = buttons.filter(function(b) { return b.classList.contains("selected"); })[0];
        var first = buttons.filter(isOurs)[0];
        if (hid && first && (!selected || selected.style.display === "none")) {
            first.click();
            setTimeout(function() {  // the buttons gradio re-creates for the new selection
                sdtrain.hideHostTabs();
                sdtrain.fitTrainTab();
            }, 0);
        }
        return hid;
    };

    // In the host's Train tab the right-hand column (#ti_gallery_container) belongs to the host's
    // trainer; sdtrain's sub-tabs carry their own output column beside the form, so it is hidden
    // while one of them is selected.
    sdtrain.fitTrainTab = function() {
        var container = app().querySelector("#ti_gallery_container");
        if (!container) {
            return;
        }
        var selected = trainTabButtons().filter(function(b) { return b.classList.contains("selected"); })[0];
        var ours = Boolean(selected && isOurs(selected));
        // the Train tab's row is the webui's resizable grid (javascript/resizeHandle.js): the form's
        // column takes the whole width while the host's column and the handle are hidden
        var row = container.parentElement;
        container.style.display = ours ? "none" : "";
        if (row && row.resizeHandle) {
            row.resizeHandle.style.display = ours ? "none" : "";
        }
        if (row && row.style.display === "grid") {
            if (ours && row.dataset.sdtrainColumns === undefined) {
                row.dataset.sdtrainColumns = row.style.gridTemplateColumns;
                row.style.gridTemplateColumns = "1fr";
            } else if (!ours && row.dataset.sdtrainColumns !== undefined) {
                row.style.gridTemplateColumns = row.dataset.sdtrainColumns;
                delete row.dataset.sdtrainColumns;
            }
        }
    };

    // Lists right at once: the webui may load the model (and so its embeddings) after the page was
    // built, so the lists are asked for again when the page loads.
    sdtrain.refreshLists = function() {
        ["sdtrain_train_embedding_refresh", "sdtrain_train_hypernetwork_refresh", "sdtrain_jobs_refresh"].forEach(function(id) {
            var b = app().querySelector("#" + id);
            if (b) {
                b.click();
            }
        });
    };

    var started = false;
    function start() {
        if (started || !window.opts || Object.keys(window.opts).length === 0) {
            return;
        }
        started = true;
        var tabs = app().querySelector("#train_tabs");
        if (tabs) {  // a sub-tab picked: the host's output column shows for the host's tabs only
            tabs.addEventListener("click", function() { setTimeout(sdtrain.fitTrainTab, 0); });
        }
        sdtrain.hideHostTabs();
        sdtrain.fitTrainTab();
        sdtrain.refreshLists();
    }

    if (typeof onOptionsChanged === "function") {
        onOptionsChanged(start);
    }
    if (typeof onUiLoaded === "function") {
        onUiLoaded(start);
    }
    if (typeof onAfterUiUpdate === "function") {
        onAfterUiUpdate(function() {
            start();
            if (started) {
                // gradio re-creates a tab button when its selection changes: hide again what came back
                sdtrain.hideHostTabs();
                sdtrain.fitTrainTab();
            }
        });
    }
})(window.sdtrain);
