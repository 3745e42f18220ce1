/* Periodic neighbour lists of crystals, CGCNN's selection rules, compiled by crystal_transfer.native.
 *
 * For every atom i of a crystal (lattice rows a, b, c; fractional coordinates f) the candidates are all pairs
 * (j, image n) with squared distance |(f_j + n - f_i) L|^2 < r^2 + tol2 (pymatgen's find_points_in_spheres
 * test, tol2 = 1e-8), except the atom itself (distance <= 1e-8 A and the same element). They are ranked as
 * graphs.select_neighbours does: when there are more than M, only those within the M-th smallest distance
 * plus `margin` are kept; sorted by (distance, j, image); consecutive distances closer than `tie_tol` form one
 * shell; a shell is ordered by (j, image); the first M are the atom's neighbours. Images are counted from the
 * wrapped coordinates f - floor(f): that shifts every image of one j by the same vector and keeps their order.
 *
 * Per candidate pair the image range along axis k is exact: the k-th fractional component of a Cartesian
 * vector of length <= r is at most r |column k of L^-1| in magnitude.
 *
 * No -ffast-math assumption is relied on for correctness: distances may differ from pymatgen's in the last
 * bits (another summation order), which the float32 output and the 1e-6 A tie tolerance absorb.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double d2;
    int64_t j;
    int64_t n[3];
} ct_candidate;

/* (distance, j, image) order */
static int before(const ct_candidate *a, const ct_candidate *b) {
    if (a->d2 != b->d2) return a->d2 < b->d2;
    if (a->j != b->j) return a->j < b->j;
    for (int k = 0; k < 3; k++)
        if (a->n[k] != b->n[k]) return a->n[k] < b->n[k];
    return 0;
}

/* (j, image) order, inside one shell */
static int before_in_shell(const ct_candidate *a, const ct_candidate *b) {
    if (a->j != b->j) return a->j < b->j;
    for (int k = 0; k < 3; k++)
        if (a->n[k] != b->n[k]) return a->n[k] < b->n[k];
    return 0;
}

static int compare(const void *x, const void *y) {
    const ct_candidate *a = x, *b = y;
    return before(a, b) ? -1 : before(b, a) ? 1 : 0;
}

static void insertion_sort(ct_candidate *c, int64_t n, int (*less)(const ct_candidate *, const ct_candidate *)) {
    for (int64_t i = 1; i < n; i++) {
        ct_candidate key = c[i];
        int64_t k = i - 1;
        while (k >= 0 && less(&key, &c[k])) {
            c[k + 1] = c[k];
            k--;
        }
        c[k + 1] = key;
    }
}

/* the k-th smallest (0-based) of v[0..n) by quickselect; v is reordered */
static double kth_smallest(double *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        double pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] < pivot) i++;
            while (v[j] > pivot) j--;
            if (i <= j) {
                double t = v[i];
                v[i] = v[j];
                v[j] = t;
                i++;
                j--;
            }
        }
        if (k <= j)
            hi = j;
        else if (k >= i)
            lo = i;
        else
            return v[k];
    }
    return v[k];
}

/* The integers n in [lo, hi] with a t^2 + 2 half_b t + c < 0 for t = offset + n (a > 0), widened by a hair
 * against rounding (the caller's exact distance test decides); returns 0 when there are none. */
static int image_range(double half_b, double a, double inv_a, double c, double offset, double lo, double hi,
                       double *first, double *last) {
    double disc = half_b * half_b - a * c;
    if (disc < 0) return 0;
    double root = sqrt(disc);
    *first = fmax(lo, ceil((-half_b - root) * inv_a - offset - 1e-9));
    *last = fmin(hi, floor((-half_b + root) * inv_a - offset + 1e-9));
    return 1;
}

/* 3x3 inverse of row-major m into inv; returns 0 when singular */
static int invert3(const double *m, double *inv) {
    double c00 = m[4] * m[8] - m[5] * m[7], c01 = m[5] * m[6] - m[3] * m[8], c02 = m[3] * m[7] - m[4] * m[6];
    double det = m[0] * c00 + m[1] * c01 + m[2] * c02;
    if (!(fabs(det) > 0)) return 0;
    inv[0] = c00 / det;
    inv[1] = (m[2] * m[7] - m[1] * m[8]) / det;
    inv[2] = (m[1] * m[5] - m[2] * m[4]) / det;
    inv[3] = c01 / det;
    inv[4] = (m[0] * m[8] - m[2] * m[6]) / det;
    inv[5] = (m[2] * m[3] - m[0] * m[5]) / det;
    inv[6] = c02 / det;
    inv[7] = (m[1] * m[6] - m[0] * m[7]) / det;
    inv[8] = (m[0] * m[4] - m[1] * m[3]) / det;
    return 1;
}

/* One crystal of `na` atoms. Outputs: idx (na*M, int64) and dist (na*M, float32) filled with the neighbours
 * and padded with (0, pad_dist); count (na): real neighbours per atom. *buf/*cap is a reusable candidate buffer.
 * Returns 0, -1 when memory runs out, -2 for a singular lattice, -3 for non-finite coordinates. */
static int crystal(int64_t na, const double *lat, const double *frac, const int64_t *numbers, double radius,
                   int64_t M, double tol2, double tie_tol, double margin, float pad_dist, int64_t *idx, float *dist,
                   int64_t *count, ct_candidate **buf, int64_t *cap, double **dbuf, int64_t *dcap) {
    double inv[9];
    if (!invert3(lat, inv)) return -2;
    double cut2 = radius * radius + tol2;
    double reach = sqrt(cut2) * (1.0 + 1e-12) + 1e-12;
    double R[3];
    double cc = lat[6] * lat[6] + lat[7] * lat[7] + lat[8] * lat[8], inv_cc = 1.0 / cc;
    /* a and b without their components along c: a' = a - (a.c/c.c) c; the Gram entries of a', b' */
    double ac = lat[0] * lat[6] + lat[1] * lat[7] + lat[2] * lat[8];
    double bc = lat[3] * lat[6] + lat[4] * lat[7] + lat[5] * lat[8];
    double aa = lat[0] * lat[0] + lat[1] * lat[1] + lat[2] * lat[2];
    double bb = lat[3] * lat[3] + lat[4] * lat[4] + lat[5] * lat[5];
    double ab = lat[0] * lat[3] + lat[1] * lat[4] + lat[2] * lat[5];
    double aa_p = aa - ac * ac * inv_cc, bb_p = bb - bc * bc * inv_cc, ab_p = ab - ac * bc * inv_cc;
    double inv_bb_p = 1.0 / bb_p;
    for (int k = 0; k < 3; k++) R[k] = reach * sqrt(inv[k] * inv[k] + inv[3 + k] * inv[3 + k] + inv[6 + k] * inv[6 + k]);
    double *w = malloc((size_t)(na > 0 ? na : 1) * 3 * sizeof(double));
    if (!w) return -1;
    for (int64_t a = 0; a < na * 3; a++) {
        if (!isfinite(frac[a])) {
            free(w);
            return -3;
        }
        w[a] = frac[a] - floor(frac[a]);
    }
    for (int64_t i = 0; i < na; i++) {
        int64_t nc = 0;
        for (int64_t j = 0; j < na; j++) {
            double d[3], lo[3], hi[3];
            for (int k = 0; k < 3; k++) {
                d[k] = w[j * 3 + k] - w[i * 3 + k];
                lo[k] = ceil(-R[k] - d[k]);
                hi[k] = floor(R[k] - d[k]);
            }
            for (double n0 = lo[0]; n0 <= hi[0]; n0 += 1.0) {
                double u0 = d[0] + n0;
                double x0 = u0 * lat[0], y0 = u0 * lat[1], z0 = u0 * lat[2];
                /* the lines p + t c that pass within the cut-off: |u0 a' + u1 b'|^2 < cut2 with a', b' the parts
                 * of a, b perpendicular to c, a quadratic in u1 (ranges widened by a hair against rounding; the
                 * exact test below decides) */
                double n1_first, n1_last;
                if (!image_range(u0 * ab_p, bb_p, inv_bb_p, u0 * u0 * aa_p - cut2, d[1], lo[1], hi[1], &n1_first,
                                 &n1_last))
                    continue;
                for (double n1 = n1_first; n1 <= n1_last; n1 += 1.0) {
                    double u1 = d[1] + n1;
                    double px = x0 + u1 * lat[3], py = y0 + u1 * lat[4], pz = z0 + u1 * lat[5];
                    /* |p + u2 c|^2 < cut2, a quadratic in u2 */
                    double pc = px * lat[6] + py * lat[7] + pz * lat[8], first, last;
                    if (!image_range(pc, cc, inv_cc, px * px + py * py + pz * pz - cut2, d[2], lo[2], hi[2], &first,
                                     &last))
                        continue;
                    for (double n2 = first; n2 <= last; n2 += 1.0) {
                        double u2 = d[2] + n2;
                        double x = px + u2 * lat[6], y = py + u2 * lat[7], z = pz + u2 * lat[8];
                        double d2 = x * x + y * y + z * z;
                        if (!(d2 < cut2)) continue;
                        if (d2 <= 1e-16 && numbers[i] == numbers[j]) continue; /* the atom itself */
                        if (nc == *cap) {
                            int64_t grown = *cap ? 2 * *cap : 256;
                            ct_candidate *more = realloc(*buf, (size_t)grown * sizeof(ct_candidate));
                            if (!more) {
                                free(w);
                                return -1;
                            }
                            *buf = more;
                            *cap = grown;
                        }
                        ct_candidate *c = *buf + nc++;
                        c->d2 = d2;
                        c->j = j;
                        c->n[0] = (int64_t)n0;
                        c->n[1] = (int64_t)n1;
                        c->n[2] = (int64_t)n2;
                    }
                }
            }
        }
        ct_candidate *c = *buf;
        if (nc > M) { /* pre-selection: within the M-th smallest distance plus margin */
            if (nc > *dcap) {
                double *more = realloc(*dbuf, (size_t)nc * sizeof(double));
                if (!more) {
                    free(w);
                    return -1;
                }
                *dbuf = more;
                *dcap = nc;
            }
            for (int64_t a = 0; a < nc; a++) (*dbuf)[a] = c[a].d2;
            /* sqrt is monotonic: the M-th smallest distance is the root of the M-th smallest square */
            double limit = sqrt(kth_smallest(*dbuf, nc, M - 1)) + margin;
            double coarse = limit * (1.0 + 1e-9);
            coarse *= coarse; /* a cheap test on squares first, the exact one (as NumPy's) on the few left */
            int64_t kept = 0;
            for (int64_t a = 0; a < nc; a++)
                if (c[a].d2 <= coarse && sqrt(c[a].d2) <= limit) c[kept++] = c[a];
            nc = kept;
        }
        if (nc <= 32)
            insertion_sort(c, nc, before);
        else
            qsort(c, (size_t)nc, sizeof(ct_candidate), compare);
        /* shells of distances closer than tie_tol to the previous one, each ordered by (j, image) */
        int64_t start = 0;
        double previous = nc ? sqrt(c[0].d2) : 0.0;
        for (int64_t a = 1; a <= nc; a++) {
            double here = a < nc ? sqrt(c[a].d2) : 0.0;
            if (a == nc || here - previous > tie_tol) {
                if (a - start > 1) insertion_sort(c + start, a - start, before_in_shell);
                if (a >= M) break;
                start = a;
            }
            previous = here;
        }
        int64_t take = nc < M ? nc : M;
        count[i] = take;
        for (int64_t s = 0; s < M; s++) {
            idx[i * M + s] = s < take ? c[s].j : 0;
            dist[i * M + s] = s < take ? (float)sqrt(c[s].d2) : pad_dist;
        }
    }
    free(w);
    return 0;
}

/* Crystals [0, n_crystals): atoms of crystal c are rows atom_ptr[c]..atom_ptr[c+1] of frac/numbers (and of
 * idx/dist/count); lattices are row-major 3x3; radii[c] is its cut-off and pad_dist[c] its padded slots' distance.
 * Returns 0, or the first failing crystal's error code (-1 memory, -2 singular lattice, -3 non-finite
 * coordinates) with its index in *failed. */
int64_t ct_neighbour_lists(int64_t n_crystals, const int64_t *atom_ptr, const double *lattices, const double *frac,
                           const int64_t *numbers, const double *radii, const float *pad_dist, int64_t M,
                           double tol2, double tie_tol, double margin, int64_t *idx, float *dist, int64_t *count,
                           int64_t *failed) {
    ct_candidate *buf = NULL;
    double *dbuf = NULL;
    int64_t cap = 0, dcap = 0;
    int status = 0;
    for (int64_t c = 0; c < n_crystals; c++) {
        int64_t a0 = atom_ptr[c], na = atom_ptr[c + 1] - a0;
        status = crystal(na, lattices + 9 * c, frac + 3 * a0, numbers + a0, radii[c], M, tol2, tie_tol, margin,
                         pad_dist[c], idx + a0 * M, dist + a0 * M, count + a0, &buf, &cap, &dbuf, &dcap);
        if (status != 0) {
            *failed = c;
            break;
        }
    }
    free(buf);
    free(dbuf);
    return status;
}
