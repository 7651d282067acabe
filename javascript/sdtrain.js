// sdtrain: browser-side helpers. Everything lives on window.sdtrain so nothing collides with the
// webui's globals (the host's textualInversion.js defines start_training_textual_inversion).
window.sdtrain = window.sdtrain || {};
