/* The per-rank memory chart as SVG: plain elements only (rect, line, text), so that any browser
 * and headless Chromium (scripts/render-svg.sh) draw it the same way. */
#include "inspect/svg.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* Segments from the bottom of a bar up: model state first, activations and ZeRO's transients on top. */
static const struct { int kind; const char *label, *color; } segments[] = {
    { MPS_KIND_PARAM, "parameters", "#4e79a7" },
    { MPS_KIND_GRAD, "gradients", "#f28e2b" },
    { MPS_KIND_MASTER, "fp32 master (mixed)", "#76b7b2" },
    { MPS_KIND_ADAM_M, "Adam m", "#59a14f" },
    { MPS_KIND_ADAM_V, "Adam v", "#edc948" },
    { -1, "activations", "#b07aa1" },
    { -2, "ZeRO transient", "#9c755f" },
    { -3, "CUDA runtime", "#bab0ac" },
};
#define NSEG ((int)(sizeof segments / sizeof segments[0]))

/* A round tick step (1, 2 or 5 times a power of ten) giving about 6 ticks up to top. */
static double tick_step(double top)
{
    double raw = top / 6, mag = pow(10, floor(log10(raw)));
    double r = raw / mag;
    return (r <= 1 ? 1 : r <= 2 ? 2 : r <= 5 ? 5 : 10) * mag;
}

/* Escapes text for an XML text node or attribute. */
static void put_text(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        case '"': fputs("&quot;", f); break;
        default: fputc(*s, f);
        }
    }
}

int mps_svg_write_plan(const char *path, const mps_plan *plan, const mps_svg_opts *o, mps_err *err)
{
    const int world = mps_plan_world(plan);
    /* the axis unit: the largest of the family that keeps the peak at 1 or more */
    static const char *const dec[] = { "B", "kB", "MB", "GB", "TB" }, *const bin[] = { "B", "KiB", "MiB", "GiB", "TiB" };
    const double base = o->binary_units ? 1024.0 : 1000.0;
    double largest = (double)mps_plan_peak(plan, NULL);
    if ((double)o->gpu_mem > largest)
        largest = (double)o->gpu_mem;
    int unit_index = 0;
    double unit = 1;
    while (unit_index < 4 && largest >= unit * base) {
        unit *= base;
        unit_index++;
    }
    const char *unit_name = o->binary_units ? bin[unit_index] : dec[unit_index];
    /* geometry of the drawing, in px */
    double bar_step = 960.0 / world;
    if (bar_step > 48) bar_step = 48;
    if (bar_step < 1) bar_step = 1;
    const double left = 90, top = 70, plot_h = 380, legend_w = 230;
    const double plot_w = bar_step * world;
    /* the budget's label goes right of the plot, on the line's level, so that no bar can hide it;
     * the legend moves right by its width (about 7.5 px per character at 13 px) */
    char budget_label[96] = "";
    if (o->gpu_mem > 0) {
        if (o->gpu_mem_label)
            snprintf(budget_label, sizeof budget_label, "GPU memory %s", o->gpu_mem_label);
        else
            snprintf(budget_label, sizeof budget_label, "GPU memory %.3g %s", (double)o->gpu_mem / unit, unit_name);
    }
    const double label_w = budget_label[0] ? 12 + 7.5 * (double)strlen(budget_label) : 0;
    const double legend_x = left + plot_w + label_w + 30;
    const double bar_w = bar_step > 3 ? bar_step * 0.8 : bar_step;

    int peak_rank;
    double peak = (double)mps_plan_peak(plan, &peak_rank) / unit;
    const mps_plan_opts *po = mps_plan_options(plan);
    char subtitle[256];
    snprintf(subtitle, sizeof subtitle,
             "%s precision, micro-batch %lld x %lld tokens, recompute %s; peak %.2f %s on rank %d",
             mps_precision_name(po->precision), (long long)po->micro_batch, (long long)po->seq,
             mps_recompute_name(po->recompute), peak, unit_name, peak_rank);
    /* wide enough for the legend and for the two lines of text above the chart (a few ranks make a
     * narrow plot): about 10 px per character of the 16 px bold title, 7.5 of the rest */
    const char *title = o->title ? o->title : "memory per rank";
    double width = legend_x + legend_w, height = top + plot_h + 80;
    if (width < left + 10 * (double)strlen(title) + 20)
        width = left + 10 * (double)strlen(title) + 20;
    if (width < left + 7.5 * (double)strlen(subtitle) + 20)
        width = left + 7.5 * (double)strlen(subtitle) + 20;
    double budget = (double)o->gpu_mem / unit;
    double y_top = (budget > peak ? budget : peak) * 1.08;
    if (y_top <= 0)
        y_top = 1;
    double step = tick_step(y_top);
    y_top = ceil(y_top / step) * step;

    FILE *f = fopen(path, "w");
    if (!f)
        return mps_fail(err, MPS_EIO, "--svg %s: cannot create (%s)", path, strerror(errno));
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%.0f\" height=\"%.0f\" "
               "viewBox=\"0 0 %.0f %.0f\" font-family=\"DejaVu Sans, Arial, Helvetica, sans-serif\" font-size=\"13\">\n",
            width, height, width, height);
    fprintf(f, "<rect x=\"0\" y=\"0\" width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n", width, height);
    fprintf(f, "<text x=\"%.0f\" y=\"26\" font-size=\"16\" font-weight=\"bold\">", left);
    put_text(f, title);
    fprintf(f, "</text>\n");
    fprintf(f, "<text x=\"%.0f\" y=\"46\" fill=\"#444\">%s</text>\n", left, subtitle);

    /* y axis: grid lines and labels */
    for (double v = 0; v <= y_top + step / 2; v += step) {
        double y = top + plot_h - v / y_top * plot_h;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", left, y, left + plot_w, y);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", left - 8, y + 4, v);
    }
    fprintf(f, "<text transform=\"translate(24 %.1f) rotate(-90)\" text-anchor=\"middle\">memory per GPU (%s)</text>\n",
            top + plot_h / 2, unit_name);

    /* the bars */
    for (int r = 0; r < world; r++) {
        mps_rank_usage u;
        mps_plan_rank(plan, r, &u);
        double x = left + r * bar_step + (bar_step - bar_w) / 2, base = 0;
        fprintf(f, "<g><title>rank %d (pp %d, dp %d, tp %d): %.3f %s</title>\n", r, u.at.pp, u.at.dp, u.at.tp,
                (double)u.total / unit, unit_name);
        for (int s = 0; s < NSEG; s++) {
            int k = segments[s].kind;
            double v = (double)(k >= 0 ? u.bytes[k] : k == -1 ? u.activations : k == -2 ? u.transient : u.runtime) / unit;
            if (v <= 0)
                continue;
            double y1 = top + plot_h - (base + v) / y_top * plot_h, h = v / y_top * plot_h;
            fprintf(f, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\"/>\n", x, y1, bar_w, h,
                    segments[s].color);
            base += v;
        }
        fprintf(f, "</g>\n");
    }

    /* x axis: about 16 rank labels at most */
    int label_every = 1;
    while (world / label_every > 16)
        label_every *= 2;
    for (int r = 0; r < world; r += label_every) {
        double x = left + (r + 0.5) * bar_step;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", x, top + plot_h, x,
                top + plot_h + 5);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%d</text>\n", x, top + plot_h + 20, r);
    }
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", left, top + plot_h,
            left + plot_w, top + plot_h);
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", left, top, left, top + plot_h);
    /* centred under the plot, unless the plot is narrower than the text (about 400 px) */
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">rank (%d ranks; rank = (pp_rank*dp + dp_rank)*tp + tp_rank)</text>\n",
            plot_w > 420 ? left + plot_w / 2 : left + 210, top + plot_h + 48, world);

    if (o->gpu_mem > 0) {
        double y = top + plot_h - budget / y_top * plot_h;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#d62728\" stroke-width=\"2\" "
                   "stroke-dasharray=\"8 4\"/>\n", left, y, left + plot_w + 6, y);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"start\" fill=\"#d62728\">", left + plot_w + 12, y + 4);
        put_text(f, budget_label);
        fprintf(f, "</text>\n");
    }

    /* legend */
    double lx = legend_x;
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-weight=\"bold\">legend</text>\n", lx, top + 4);
    for (int s = NSEG - 1, row = 0; s >= 0; s--, row++) { /* top to bottom as stacked */
        double y = top + 20 + row * 24;
        fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"16\" height=\"16\" fill=\"%s\"/>\n", lx, y, segments[s].color);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", lx + 24, y + 13, segments[s].label);
    }
    fprintf(f, "</svg>\n");
    int bad = ferror(f);
    if (fclose(f) != 0 || bad)
        return mps_fail(err, MPS_EIO, "--svg %s: write failed (%s)", path, strerror(errno));
    return 0;
}
