"""Fixed texts of different kinds for the tokenizer's compression table.

Notable:
- Written for this project (no third-party text, no licence to track) and kept
  in code, so every run of every tokenizer is measured on the same bytes.
- One entry per kind the table reports: prose, code, math, non_english. The
  validation-shard slice is the fifth kind (`val`) and is read from data.
- Each text is a few kilobytes: big enough that the per-text boundary effects
  vanish, small enough to encode in milliseconds with every baseline.
"""

PROSE = """\
The village sat at the bend of a slow brown river, and every spring the water rose until it touched the lowest step of the mill. Nobody remembered a year when it had gone higher. The miller's daughter kept a notebook in which she wrote the date, the height of the water, and a sentence about the weather; after twelve years the notebook had become the most reliable record of the valley's climate that anyone possessed.

When the engineers from the city arrived to plan a dam, they asked for measurements. The mayor offered them the church registers, which recorded floods only when a funeral had to be postponed. The schoolteacher offered a painting. The miller's daughter, who was by then a grown woman with a business of her own, said nothing at the first meeting. At the second she put the notebook on the table and pushed it across without a word.

The engineers read it for an hour. They found that the river had risen a little earlier each decade, that the largest floods followed warm winters rather than wet ones, and that the old stories about a great flood "in grandfather's time" were probably true, because the bend in the river had once been much farther east. They rewrote their plan twice. The dam they finally built was smaller than the first design, cheaper than the second, and placed where the notebook suggested, a mile upstream, where the rock was firm and the valley narrow.

Years later a student asked her why she had kept the notebook at all. She thought about it for a while. "Because the river was the only thing in the village that changed slowly enough to be noticed," she said, "and quickly enough to matter."

Good writing about science often works the same way. It picks one careful observation, repeats it patiently, and lets the pattern speak. The reader does not need every number; they need to trust that someone counted. A paragraph that explains why a measurement was taken, how it was checked, and what it failed to show is worth more than a page of confident conclusions.
"""

CODE = '''\
import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable


@dataclass(order=True)
class Task:
    priority: int
    name: str = field(compare=False)
    deps: tuple[str, ...] = field(default=(), compare=False)


def topological_order(tasks: Iterable[Task]) -> list[str]:
    """Return task names so that every task comes after its dependencies.

    Ties are broken by priority (lower first), then by name, so the order is
    deterministic. Raises ValueError on a cycle, naming the tasks involved.
    """
    by_name = {t.name: t for t in tasks}
    waiting = {name: set(t.deps) for name, t in by_name.items()}
    users = defaultdict(list)
    for name, deps in waiting.items():
        for dep in deps:
            if dep not in by_name:
                raise ValueError(f"task {name!r} depends on unknown task {dep!r}")
            users[dep].append(name)
    ready = [(by_name[n].priority, n) for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for user in users[name]:
            waiting[user].discard(name)
            if not waiting[user]:
                heapq.heappush(ready, (by_name[user].priority, user))
    if len(order) != len(by_name):
        stuck = sorted(n for n, deps in waiting.items() if deps)
        raise ValueError(f"dependency cycle among: {', '.join(stuck)}")
    return order


if __name__ == "__main__":
    plan = [Task(2, "test", ("build",)), Task(1, "build", ("fetch",)), Task(0, "fetch"), Task(3, "ship", ("test",))]
    for i, step in enumerate(topological_order(plan), 1):
        print(f"{i:>2}. {step}")

// The same idea in C, for a fixed-size graph stored as an adjacency matrix.
#include <stdio.h>
#define N 8
int adj[N][N], indeg[N], queue[N];

int toposort(int n, int *out) {
    int head = 0, tail = 0, count = 0;
    for (int v = 0; v < n; v++) if (indeg[v] == 0) queue[tail++] = v;
    while (head < tail) {
        int v = queue[head++];
        out[count++] = v;
        for (int w = 0; w < n; w++)
            if (adj[v][w] && --indeg[w] == 0) queue[tail++] = w;
    }
    return count == n ? 0 : -1;  /* -1: the graph has a cycle */
}
'''

MATH = r"""Let $f(x) = x^3 - 6x^2 + 11x - 6$. Then $f(1) = 1 - 6 + 11 - 6 = 0$, so $(x - 1)$ divides $f$, and
$$f(x) = (x - 1)(x^2 - 5x + 6) = (x - 1)(x - 2)(x - 3).$$
The roots are $x \in \{1, 2, 3\}$, and $f'(x) = 3x^2 - 12x + 11$ vanishes at $x = 2 \pm \frac{1}{\sqrt{3}} \approx 2.577, 1.423$.

Theorem. For every integer $n \geq 1$, $\sum_{k=1}^{n} k^2 = \frac{n(n+1)(2n+1)}{6}$.
Proof. For $n = 1$ both sides equal 1. Suppose it holds for $n$. Then
$\sum_{k=1}^{n+1} k^2 = \frac{n(n+1)(2n+1)}{6} + (n+1)^2 = \frac{(n+1)(2n^2 + 7n + 6)}{6} = \frac{(n+1)(n+2)(2n+3)}{6}$,
which is the formula for $n + 1$. $\blacksquare$

Worked example: a loan of 12,500.00 at 4.75% per year, compounded monthly for 36 months, grows to
12500 * (1 + 0.0475/12)^36 = 12500 * 1.003958^36 ≈ 12500 * 1.15285 ≈ 14,410.63.
The monthly payment that repays it is P = r*L / (1 - (1 + r)^-n) with r = 0.0039583, L = 12500, n = 36:
P ≈ 49.479 / 0.13259 ≈ 373.23, so the total paid is 36 * 373.23 = 13,436.28 and the interest 936.28.

Table of values: x = 0.0, 0.5, 1.0, 1.5, 2.0; e^x = 1.0000, 1.6487, 2.7183, 4.4817, 7.3891;
ln(1 + x) = 0.0000, 0.4055, 0.6931, 0.9163, 1.0986. Note that 2^10 = 1024, 2^16 = 65536, 2^20 = 1048576,
and 3.14159 × 2 = 6.28318; ∫₀^π sin(x) dx = 2; ∇·(∇φ) = Δφ; ∀ε > 0 ∃δ > 0: |x − a| < δ ⇒ |f(x) − f(a)| < ε.
Matrix product: [[1, 2], [3, 4]] · [[5, 6], [7, 8]] = [[19, 22], [43, 50]]; det = 1·4 − 2·3 = −2.
"""

NON_ENGLISH = """\
Le petit village se trouvait au bord d'une rivière lente, et chaque printemps l'eau montait jusqu'à la première marche du moulin. Personne ne se souvenait d'une année où elle était allée plus haut.

Das Dorf lag an der Biegung eines langsamen, braunen Flusses. Jedes Frühjahr stieg das Wasser, bis es die unterste Stufe der Mühle berührte; niemand erinnerte sich an ein Jahr, in dem es höher gestiegen wäre.

El pueblo estaba en la curva de un río lento y marrón. Cada primavera el agua subía hasta tocar el escalón más bajo del molino, y nadie recordaba un año en que hubiera llegado más alto.

A aldeia ficava na curva de um rio lento e castanho. Todas as primaveras a água subia até tocar o degrau mais baixo do moinho.

Деревня стояла у излучины медленной бурой реки. Каждую весну вода поднималась до нижней ступени мельницы, и никто не помнил года, когда она поднялась бы выше.

Το χωριό βρισκόταν στην καμπή ενός αργού, καφετιού ποταμού. Κάθε άνοιξη το νερό ανέβαινε ως το χαμηλότερο σκαλοπάτι του μύλου.

村子坐落在一条缓慢的褐色河流的拐弯处。每年春天，河水都会涨到磨坊最低的台阶，没有人记得哪一年水位更高。磨坊主的女儿有一个笔记本，记录日期、水位和天气。

村は、ゆっくりと流れる茶色い川の曲がり角にあった。毎年春になると、水は水車小屋のいちばん下の段まで上がった。それより高くなった年を覚えている人はいなかった。

마을은 느리게 흐르는 갈색 강의 굽이에 있었다. 봄마다 물은 방앗간의 가장 낮은 계단까지 차올랐고, 그보다 높았던 해를 기억하는 사람은 없었다.

القرية كانت تقع عند منعطف نهر بني بطيء، وفي كل ربيع كان الماء يرتفع حتى يلامس أدنى درجة في الطاحونة.

गाँव एक धीमी भूरी नदी के मोड़ पर बसा था। हर वसंत में पानी चक्की की सबसे निचली सीढ़ी तक चढ़ आता था।

Köy, yavaş akan kahverengi bir nehrin kıvrımındaydı. Her ilkbaharda su, değirmenin en alt basamağına kadar yükselirdi.

Wieś leżała w zakolu powolnej, brunatnej rzeki. Każdej wiosny woda podnosiła się aż do najniższego stopnia młyna.
"""

TEXTS = {"prose": PROSE, "code": CODE, "math": MATH, "non_english": NON_ENGLISH}
